"""instances table (one row per stored instance file) and the study-level columns of series

DICOM networking and DICOMweb address instances by SOP Instance UID and match studies on
these columns. Rows for series stored before this revision: `flask --app app index-instances`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 16:05:00

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('instances',
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=True),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), nullable=True),
    sa.Column('rows', sa.Integer(), nullable=True),
    sa.Column('columns', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['series_uid'], ['series.series_uid'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('series_uid', 'instance_number')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_sop_instance_uid'), ['sop_instance_uid'], unique=False)

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('study_date', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('study_time', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('accession_number', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('study_description', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('study_id', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('referring_physician_name', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('series_number', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_series_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_date'), ['study_date'], unique=False)



def downgrade():
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_date'))
        batch_op.drop_index(batch_op.f('ix_series_accession_number'))
        batch_op.drop_column('series_number')
        batch_op.drop_column('referring_physician_name')
        batch_op.drop_column('study_id')
        batch_op.drop_column('study_description')
        batch_op.drop_column('accession_number')
        batch_op.drop_column('study_time')
        batch_op.drop_column('study_date')

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_sop_instance_uid'))

    op.drop_table('instances')
