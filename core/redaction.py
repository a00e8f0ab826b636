"""Secrets kept out of what we print and log: the credentials inside database and broker URLs.

`mask_url` is the one way a URL reaches a message, a log line or `emolabel settings`. It parses
nothing with a library and never raises, so a URL too broken to connect with is still shown
without its password (kombu's `maybe_sanitize_url` raised on a bad port, quoting part of the
password; SQLAlchemy's rendering left a password in the query string).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Query parameters that carry a credential: `?password=`, `?sentinel_password=`, `?token=`.
_SECRET_PARAMETER = re.compile(r"pass|secret|token|credential|auth", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def mask_url(url: str) -> str:
    """`url` with the password (and any secret query parameter) replaced by `***`.

    `postgresql+psycopg://emolabel:pw@postgres/db` becomes `postgresql+psycopg://emolabel:***@
    postgres/db`; `redis://:pw@redis:6379/0` becomes `redis://:***@redis:6379/0`. Text that is not
    a URL comes back unchanged.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    # A password may hold `/`, `?`, `#` and even `@` unescaped (SQLAlchemy accepts them), so the
    # credentials run to the last `@`: hiding too much beats showing part of a password.
    userinfo, at, location = rest.rpartition("@")
    if not at:
        return f"{scheme}://{_mask_query(rest)}"
    user, colon, _ = userinfo.partition(":")
    # No colon: the whole user part may be a token (`https://token@host`), so none of it shows.
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{scheme}://{shown}@{_mask_query(location)}"


def redact(text: str, url: str) -> str:
    """`text` (an error message about `url`) without the password of `url` or any piece of it.

    Parsers quote the piece of a password they choke on (`Port could not be cast to integer
    value as 's3cr'` for `redis://:s3cr/et@host`), so each piece between separators goes too;
    pieces under 3 characters stay, since hiding them would garble the message.
    """
    password = _password(url)
    if not password:
        return text
    pieces = {password, *re.split(r"[/?#@:]", password)}
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= 3 or piece == password:
            text = text.replace(piece, MASK)
    return text


def _password(url: str) -> str:
    _, separator, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    if not (separator and at):
        return ""
    user, colon, password = userinfo.partition(":")
    return password if colon else user


def _mask_query(location: str) -> str:
    address, question, query = location.partition("?")
    if not question:
        return location
    query, hash_mark, fragment = query.partition("#")
    parameters = []
    for parameter in query.split("&"):
        name, equals, _ = parameter.partition("=")
        secret = equals and _SECRET_PARAMETER.search(name)
        parameters.append(f"{name}={MASK}" if secret else parameter)
    return f"{address}?{'&'.join(parameters)}{hash_mark}{fragment}"


def mask_urls_in_text(text: str) -> str:
    """`text` (a library's error message, say) with every URL in it masked."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)


def mask_urls(value: Any) -> Any:
    """A copy of JSON-like `value` (dicts, lists, strings) with every URL in it masked."""
    if isinstance(value, dict):
        return {key: mask_urls(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [mask_urls(item) for item in value]
    if isinstance(value, str):
        return mask_url(value)
    return value
