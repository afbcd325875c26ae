"""The audit sink and the tamper-evident ledger. The event envelope every component emits is
:mod:`trustplane.audit_events`, kept below every component (docs/architecture.md, "Layers")."""
