"""Reference settlement services built on the PEP SDK: execution, allocation (four eyes),
settlement (with event-time entitlement) and reporting over one trade state machine, a
transactional outbox of signed events (``GET /events``, NATS JetStream when configured) and the
operators' exceptions. See docs/settlement.md.

Framework-free core: :mod:`~trustplane.reference.machine` (states and transitions),
:mod:`~trustplane.reference.store` (tables, compare-and-set transitions, outbox),
:mod:`~trustplane.reference.events` (envelope, signing, verification),
:mod:`~trustplane.reference.entitlement` (mandate status at event time),
:mod:`~trustplane.reference.services`; HTTP in :mod:`~trustplane.reference.http`; the JetStream
publisher in :mod:`~trustplane.reference.jetstream`.
"""
