"""leader lease: polyqueue_leader

The maintenance leader holds a lease row here instead of a session advisory lock, which
does not survive a transaction pooler (pgbouncer in transaction mode hands the session
that took the lock to other clients). One row per elected role (``maintenance``); the
holder renews it every pass, and anyone may take it once ``expires_at`` has passed.

A frozen snapshot like the initial revision: every name and type is spelled out.

Revision ID: 3c8f1a2b9d47
Revises: ef56f936f06a
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "3c8f1a2b9d47"
down_revision: str | Sequence[str] | None = "ef56f936f06a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "polyqueue_leader",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_polyqueue_leader")),
    )


def downgrade() -> None:
    op.drop_table("polyqueue_leader")
