"""series: (modality, study_uid, series_uid, domain) index for QIDO-RS and C-FIND by modality

A search of the series of one modality in study and series order (DICOMweb's
``/series?Modality=MR&limit=20``) then walks the index in order and stops after its page,
instead of sorting every series of that modality.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:40:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('ix_series_modality_study',
                              ['modality', 'study_uid', 'series_uid', 'domain'], unique=False)


def downgrade():
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('ix_series_modality_study')
