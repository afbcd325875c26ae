"""The client registry: metadata validation, storage, the in-memory cache, RFC 7591/7592 registration;
client authentication at our endpoints and the choice of a token's audience and scopes."""
