"""The API description: /api/openapi.json."""
from flask import Blueprint

bp = Blueprint("openapi", __name__, url_prefix="/api")
