"""Alembic's environment script, run by `alembic.command.*`: migrate the connection that `Store` hands over in
`config.attributes["connection"]` (there is no alembic.ini and no URL of our own)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("taps-bench migrations run from Store(url), which passes its connection in config.attributes")

# The caller (migrations.exclusive) already holds the transaction, so begin_transaction() below opens none.
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
