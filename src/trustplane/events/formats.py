"""The signed-event formats both sides must agree on: the reference services sign trade events with
these, and the authorization server's ledger (``audit/ingest.py``) accepts only these. Kept here, in
the lowest layer, so that the ledger does not import the services."""

#: The JWS ``typ`` of a reference service's trade event (``reference/events.py``).
TRADE_EVENT_TYP = "trade-event+jwt"
#: The only algorithm a trade event is signed with.
TRADE_EVENT_ALG = "ES256"
