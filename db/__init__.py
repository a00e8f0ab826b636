"""The ledger and results store: what every job scanned, sent, labeled, failed or skipped.

`db.models` declares the tables (its docstring describes each), `db.session` makes engines and
sessions and runs the Alembic migrations in `db/migrations`, and `db.repository` (one module per
table family) holds every query the producer, the workers, training and the command line run.
`db.delivery` is the ledger as a worker sees a chunk message, `db.outbox` the one way a chunk
goes from the ledger to the queue (record, commit, publish, mark published), `db.requeue` puts a
job's failed images back, and `db.reconcile` finishes what crashes left half-done. The same code
runs on PostgreSQL and SQLite. This package imports only `core` of emolabel's.
"""
