"""Logging in and out: the OAuth2 grants, one-time strings and session tokens."""
import logging
from datetime import timedelta

from auth import check_password, digest, find_user, issue_login_token
from errors import ApiError
from models import OnetimeUrl, Token, User, db, utcnow

log = logging.getLogger(__name__)
ONETIME_LIFETIME = timedelta(seconds=60)
INVALID_CREDENTIALS = "Invalid grant: user credentials are invalid"


def _logged_in(user, ip):
    user.last_login_time = utcnow()
    user.last_login_ip = ip
    tokens = issue_login_token(user.user_email)
    db.session.commit()
    return tokens


def _onetime_user(username, password):
    """The user of a valid one-time string (consumed), or None if it is not one."""
    row = db.session.execute(db.select(OnetimeUrl).where(
        OnetimeUrl.onetime_string_hash == digest(password))).scalar_one_or_none()
    if row is None:
        return None
    if username != password or row.created_at < utcnow() - ONETIME_LIFETIME:
        raise ApiError(400, INVALID_CREDENTIALS)
    db.session.delete(row)
    return db.session.get(User, row.user_email)


def password_grant(username, password, ip):
    """Check credentials (or a one-time string); return a new token triple."""
    user = _onetime_user(username, password)
    if user is None:
        user = find_user(username)
        if user is None or not check_password(user.password, password):
            raise ApiError(400, INVALID_CREDENTIALS)
    if not user.login_enabled:
        raise ApiError(400, INVALID_CREDENTIALS)
    return _logged_in(user, ip)


def refresh_grant(refresh_token, ip):
    """Exchange a refresh token for a new pair; the old pair is deleted."""
    token = db.session.execute(db.select(Token).where(
        Token.refresh_token_hash == digest(refresh_token),
        Token.permanent_token_id.is_(None))).scalar_one_or_none()
    if token is None:
        raise ApiError(400, "Invalid grant: refresh token is invalid")
    if token.refresh_token_expires_at < utcnow():
        raise ApiError(400, "Invalid grant: refresh token has expired")
    user = db.session.get(User, token.user_email)
    db.session.delete(token)
    if user is None or not user.login_enabled:
        db.session.commit()
        raise ApiError(400, "Invalid grant: refresh token is invalid")
    return _logged_in(user, ip)


def logout(user_email):
    """Delete every session token of the user; permanent tokens stay."""
    db.session.execute(db.delete(Token).where(Token.user_email == user_email,
                                              Token.permanent_token_id.is_(None)))
    db.session.commit()
