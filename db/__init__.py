"""The ledger and results store: what every job scanned, sent, labeled, failed or skipped.

`db.models` declares the tables (its docstring describes each), `db.session` makes engines and
sessions and runs the Alembic migrations in `db/migrations`, and `db.repository` holds the
functions the producer, the workers and the command line call. The same code runs on PostgreSQL
and SQLite. This package imports nothing else of emolabel's.
"""
