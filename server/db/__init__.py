"""Persistence: the tables (`tables`), the engine (`engine`) and the schema migrations (`migrations`).

The bottom layer of `server/`: the repositories (server/ledger.py, server/job_store.py) build on it,
and nothing here imports a repository (the import-linter contract in pyproject.toml checks it).
"""
