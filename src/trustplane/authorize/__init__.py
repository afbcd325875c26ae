"""The authorization endpoint (RFC 6749 §4.1 with PKCE, RFC 9207 ``iss``, RFC 9396, RFC 8707), the
login and consent pages, and the ``authorization_code`` and ``refresh_token`` grants."""
