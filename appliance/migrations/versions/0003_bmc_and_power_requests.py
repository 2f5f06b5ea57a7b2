"""BMC settings and power state on machines; power requests

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 10:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('power_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('machine_id', sa.Integer(), nullable=False),
    sa.Column('operation', sa.String(length=16), nullable=False),
    sa.Column('args', sa.JSON(), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('error_kind', sa.String(length=16), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('power_requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_power_requests_machine_id'), ['machine_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_power_requests_state'), ['state'], unique=False)

    with op.batch_alter_table('machines', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bmc_driver', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('bmc_address', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('bmc_port', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('bmc_username', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('bmc_password', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('bmc_verify_tls', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column('bmc_system_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('power_state', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('power_checked_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('power_error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('machines', schema=None) as batch_op:
        for column in ('power_error', 'power_checked_at', 'power_state', 'bmc_system_id',
                       'bmc_verify_tls', 'bmc_password', 'bmc_username', 'bmc_port',
                       'bmc_address', 'bmc_driver'):
            batch_op.drop_column(column)
    with op.batch_alter_table('power_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_power_requests_state'))
        batch_op.drop_index(batch_op.f('ix_power_requests_machine_id'))
    op.drop_table('power_requests')
