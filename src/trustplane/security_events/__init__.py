"""The authorization server's signed security events: a filtered view of the audit ledger (the
outbox), served at ``GET /events`` and published to NATS JetStream (docs/events.md)."""
