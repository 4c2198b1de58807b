"""Alembic environment and versions; `distillery-server migrate` runs them (PostgreSQL and SQLite)."""
