"""Initial schema: api_keys, charges, credit_grants, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-05-20

A frozen copy of the tables as `metadata.create_all` made them before migrations existed; later
changes go in later revisions, never here.

It also adopts databases made by that older code (no `alembic_version` table): it creates only the
tables that are missing, and adds `charges.owner`, which `create_all` never added to a `charges`
table made before the column existed. Existing rows are kept.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import SchemaItem

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _api_keys() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("balance_micro", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("balance_micro >= 0", name="ck_api_keys_balance_non_negative"),
    ]


def _charges(*, owner_server_default: str | None = None) -> list[SchemaItem]:
    return [
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False, server_default=owner_server_default),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('reserved', 'settled', 'refunded')", name="ck_charges_status"),
        sa.CheckConstraint("amount_micro >= 0", name="ck_charges_amount_non_negative"),
        # The same indexes as `index=True` makes, but written out: batch mode's table copy leaves out
        # indexes that came from a column's `index=True`.
        sa.Index("ix_charges_key_id", "key_id"),
        sa.Index("ix_charges_owner", "owner"),
    ]


def _credit_grants() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=False, index=True),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("note", sa.String(500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _jobs() -> list[SchemaItem]:
    return [
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer, nullable=False, index=True),
        sa.Column("surface", sa.String(8), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=True),
        sa.Column("cost_micro", sa.BigInteger, nullable=False),
        sa.Column("outputs", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("progress_step", sa.Integer, nullable=False),
        sa.Column("progress_total", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("inference_s", sa.Float, nullable=True),
    ]


# In foreign-key order: charges and credit_grants refer to api_keys.
TABLES = {"api_keys": _api_keys, "charges": _charges, "credit_grants": _credit_grants, "jobs": _jobs}


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, items in TABLES.items():
        if not inspector.has_table(name):
            op.create_table(name, *items())
    charges_columns = {column["name"] for column in inspector.get_columns("charges")}
    if "owner" not in charges_columns:
        _add_charges_owner()


def _add_charges_owner() -> None:
    # A charge reserved before owners existed belongs to no server instance: '' is what reserve()
    # writes without an owner, and the default fills it in for the rows already there.
    op.add_column("charges", sa.Column("owner", sa.String(128), nullable=False, server_default=""))
    op.create_index("ix_charges_owner", "charges", ["owner"])
    # Then drop the default, as the table definition has none. SQLite cannot drop it in place, so batch
    # mode copies the table; `copy_from` describes it exactly, so nothing rests on what SQLite reflects.
    with op.batch_alter_table("charges", copy_from=_charges_with_owner_default()) as batch:
        batch.alter_column(
            "owner", existing_type=sa.String(128), existing_nullable=False, server_default=None
        )


def _charges_with_owner_default() -> sa.Table:
    metadata = sa.MetaData()
    # The referenced table must be in the same MetaData for the copied foreign key to resolve.
    sa.Table("api_keys", metadata, *_api_keys())
    return sa.Table("charges", metadata, *_charges(owner_server_default=""))


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
