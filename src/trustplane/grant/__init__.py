"""What every grant of the token endpoint is built on, below the packages that hold grants (oauth,
authorize, federation): the grant contract and the one issue path (``contract``), and the conditions
checked and the outcome recorded in the final transaction (``outcomes``)."""
