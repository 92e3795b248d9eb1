"""Alembic migrations of the SQL schema; `gpuproxy migrate` (and `gpuproxy up`) apply them."""
