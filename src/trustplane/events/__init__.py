"""Signed-event delivery shared by the authorization server and the reference services: the
generic outbox-to-JetStream publisher and the verifying durable consumer (:mod:`.jetstream`)."""
