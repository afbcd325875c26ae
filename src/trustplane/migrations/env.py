"""Alembic environment: runs on the connection handed over by trustplane.storage.migrate."""

from alembic import context

from trustplane.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via trustplane.storage.migrate
    raise SystemExit("run migrations with `trustplane migrate`")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
