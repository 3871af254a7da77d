"""The API description: /api/openapi.json."""
from flask import Blueprint, current_app

import openapi

bp = Blueprint("openapi", __name__, url_prefix="/api")


@bp.get("/openapi.json")
def get_openapi():
    """The OpenAPI 3.1 description of every route (built once per process)."""
    app = current_app._get_current_object()
    if "openapi" not in app.extensions:
        app.extensions["openapi"] = openapi.build(app)
    return app.extensions["openapi"]
