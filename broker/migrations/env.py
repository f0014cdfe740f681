"""Alembic environment: runs against the engine handed in by broker.migrate."""

from alembic import context

from broker.db import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    from broker.db import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
