"""Rich Authorization Requests (RFC 9396): the ``authorization_details`` type registry."""
