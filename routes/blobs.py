"""Voxel label blobs: /api/blob/<sha1>."""
from flask import Blueprint

bp = Blueprint("blobs", __name__, url_prefix="/api/blob")
