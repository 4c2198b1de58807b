"""one row per metric point: unique (job_id, kind, step, name)

Rows a lease-lost worker wrote twice (before writes were fenced) are dropped first, keeping the first one.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "DELETE FROM step_metrics WHERE id NOT IN (SELECT min(id) FROM step_metrics GROUP BY job_id, kind, step, name)"
    )
    op.create_index("uq_step_metrics_point", "step_metrics", ["job_id", "kind", "step", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_step_metrics_point", table_name="step_metrics")
