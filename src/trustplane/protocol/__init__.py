"""Protocol groundwork shared by every component: the scope vocabulary, access-token claims, form
parsing, response helpers, and the single-use stores (revoked tokens, replayed ``jti`` values).

Nothing here imports a component above it (see "Layers" in docs/architecture.md)."""
