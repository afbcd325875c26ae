"""The client registry: metadata validation, storage, the in-memory cache, RFC 7591/7592 registration."""
