"""Who may use the review page, and which writes are the page's own.

Never open: a request needs HTTP basic auth with Flower's user and password (when both are set;
the reviewer is that user) or the session cookie that the printed token URL sets (the reviewer
is the command's `--reviewer`). The token travels once, in the URL the command prints; opening it
sets an HttpOnly, SameSite=Strict cookie and redirects to the clean URL, so the token leaves the
address bar and the history. Secrets are compared with `hmac.compare_digest`.

A write (any method but GET/HEAD) also needs the CSRF token that the page embeds, in an
`X-CSRF-Token` header, and an `Origin`, when the browser sends one, equal to the server's own:
a cookie alone is what a cross-site form would carry, the header is what it cannot.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

COOKIE_NAME = "emolabel_review"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Credentials:
    """The secrets of one running review page."""

    token: str
    reviewer: str
    basic_user: str | None = None
    basic_password: str | None = None
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @classmethod
    def generate(
        cls, reviewer: str, basic_user: str | None = None, basic_password: str | None = None
    ) -> Credentials:
        return cls(
            token=secrets.token_urlsafe(32),
            reviewer=reviewer,
            basic_user=basic_user,
            basic_password=basic_password,
        )


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time equality of a secret given by a client and the one expected."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def basic_user(authorization: str | None, credentials: Credentials) -> str | None:
    """The user of a valid `Authorization: Basic` header; None when absent or wrong."""
    if not (authorization and credentials.basic_user and credentials.basic_password):
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    # Both compared, always, so the time taken does not tell which one was wrong.
    user_ok = same_secret(user, credentials.basic_user)
    password_ok = same_secret(password, credentials.basic_password)
    return user if colon and user_ok and password_ok else None


def reviewer_of(
    headers: Mapping[str, str], cookies: Mapping[str, str], credentials: Credentials
) -> str | None:
    """Who makes a request (basic auth, else the token's cookie); None: not authenticated."""
    user = basic_user(headers.get("authorization"), credentials)
    if user is not None:
        return user
    if same_secret(cookies.get(COOKIE_NAME), credentials.token):
        return credentials.reviewer
    return None


def write_refusal(
    method: str, headers: Mapping[str, str], own_origin: str, credentials: Credentials
) -> str | None:
    """Why a write must be refused as possibly cross-site; None for a safe method or a good one."""
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None and origin != own_origin:
        return f"origin {origin} is not this page's"
    if not same_secret(headers.get(CSRF_HEADER), credentials.csrf_token):
        return "missing or wrong X-CSRF-Token header (reload the page)"
    return None
