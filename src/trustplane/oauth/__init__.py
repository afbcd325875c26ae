"""The OAuth 2.0 authorization server: token, introspection, revocation, metadata, registration."""
