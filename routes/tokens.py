"""Permanent tokens: /api/tokens."""
from flask import Blueprint, g

import audit
from auth import check_token_request, issue_permanent_token, token_expiry_json
from errors import ApiError
from models import Token, db, iso
from validation import expects

bp = Blueprint("tokens", __name__, url_prefix="/api/tokens")
MAX_TOKENS = 10  # CIRCUS refuses a new one when the caller has *more than* 10 (quirk 25)


def _permanent_tokens(user_email):
    return db.select(Token).where(Token.user_email == user_email,
                                  Token.permanent_token_id.is_not(None))


@bp.get("")
def list_tokens():
    """The caller's permanent tokens (never their secret values)."""
    rows = db.session.execute(_permanent_tokens(g.user.user_email)
                              .order_by(Token.created_at)).scalars().all()
    items = [{"tokenId": t.permanent_token_id, "description": t.permanent_token_description,
              "scopes": t.scopes, "expiresAt": token_expiry_json(t.access_token_expires_at),
              "createdAt": iso(t.created_at), "updatedAt": iso(t.updated_at),
              "lastUsedAt": iso(t.last_used_at)} for t in rows]
    return {"items": items, "totalItems": len(items), "page": 1}


@bp.post("")
@expects("token-request")
def create_token(body):
    """Issue a permanent token (optionally scoped, expiring); its value is shown only here."""
    scopes, expires_at = check_token_request(body.get("scopes"), body.get("expiresIn"),
                                             body.get("expiresAt"))
    count = db.session.execute(db.select(db.func.count()).select_from(
        _permanent_tokens(g.user.user_email).subquery())).scalar_one()
    if count > MAX_TOKENS:
        raise ApiError(400, "You cannot create more than 10 tokens.")
    token_id, access = issue_permanent_token(g.user.user_email, body["description"],
                                             scopes, expires_at)
    audit.record("token-create", "token", token_id, detail={"scopes": scopes})
    db.session.commit()
    return {"tokenId": token_id, "accessToken": access}, 201


@bp.delete("/<token_id>")
def delete_token(token_id):
    """Delete one of the caller's permanent tokens (404 for anyone else's)."""
    token = db.session.execute(_permanent_tokens(g.user.user_email).where(
        Token.permanent_token_id == token_id)).scalar_one_or_none()
    if token is None:
        raise ApiError(404, "The requested token was not found.")
    db.session.delete(token)
    audit.record("token-delete", "token", token_id)
    db.session.commit()
    return "", 204
