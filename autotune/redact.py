"""Mask secrets in any text: the one rule every message, log line and URL display goes through.

`mask_secrets` replaces the password of every URL-like `scheme://user:password@host...` by `***`
(user and host stay readable) and the value of every query or keyword parameter that names a
secret (`?password=...`, `&token=...`, `sslpassword=...`, case-insensitive). It works on text,
not on parsed URLs, so malformed URLs are masked too: a bad port, an unclosed IPv6 bracket, a
password holding '@', ':' or '/' (the password runs to the last '@' before the next
whitespace), a percent-encoded password.

Standard library only: the CLI imports it without SQLAlchemy.
"""

from __future__ import annotations

import re

MASK = "***"
SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key")

# `//user:` (after a scheme, or at the start of a scheme-less `//`), then the password up to the
# last '@' of the whitespace-free run; or, for a password holding spaces (no valid URL has one,
# but a typed one may), words without '/' up to an '@'.
_USERINFO = re.compile(
    r"(?P<head>(?:[A-Za-z][A-Za-z0-9+.\-]*:|(?<![\w/:.+\-]))//[^\s:/@]*:)"
    r"(?P<secret>\S+(?=@)|[^\s@/]+(?:[ \t]+[^\s@/]+)+(?=@))"
)
# `KEY=VALUE` where KEY is a secret's name, alone or after a prefix ending in '_' or '-'
# (`db_password`, `client_secret`): in a query (`?`, `&`, `;`) or a libpq keyword string. A quoted
# value (`password='a b'`) is masked whole; a quote that closes the surrounding text (as in
# `'...?password=x'`) stays, a quote inside a value is masked with it.
_PARAM = re.compile(
    r"(?P<head>(?<![\w\-])(?:[\w\-]*[_\-])?(?:" + "|".join(SECRET_KEYS) + r")=)"
    r"(?P<secret>'(?:[^'\\\n]|\\.)*'|[^&\s'\"]+(?:['\"]+[^&\s'\"]+)*|(?:['\"]+[^&\s'\"]+)+)",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """`text` with every URL password and secret parameter value replaced by `***`."""
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _PARAM.sub(lambda m: m["head"] + MASK, text)
