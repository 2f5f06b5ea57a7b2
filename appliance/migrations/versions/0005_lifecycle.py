"""lifecycle: phases, deadlines, deployments, phone-home keys, contract checks

Revision ID: 0005_lifecycle
Revises: 0004_leases_no_expiry_index
Create Date: 2026-11-22 12:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0005_lifecycle'
down_revision = '0004_leases_no_expiry_index'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('machines', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state_serial', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('phase', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('phase_started_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('phase_deadline', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('state_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('instance_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('deployment', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('ssh_host_keys', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('contract', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_machines_phase_deadline'), ['phase_deadline'],
                              unique=False)
        batch_op.create_unique_constraint('uq_machines_instance_id', ['instance_id'])
    with op.batch_alter_table('power_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purpose', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('power_requests', schema=None) as batch_op:
        batch_op.drop_column('purpose')
    with op.batch_alter_table('machines', schema=None) as batch_op:
        batch_op.drop_constraint('uq_machines_instance_id', type_='unique')
        batch_op.drop_index(batch_op.f('ix_machines_phase_deadline'))
        for column in ('contract', 'ssh_host_keys', 'deployment', 'instance_id',
                       'state_reason', 'phase_deadline', 'phase_started_at', 'phase',
                       'state_serial'):
            batch_op.drop_column(column)
