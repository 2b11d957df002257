"""`mask_secrets`: no password or secret parameter survives, whatever shape the URL is in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autotune.redact import mask_secrets

# (text, what must stay readable): every text holds the secret "secretpw" (some spelled oddly)
CASES = [
    (
        "postgresql://u:secretpw@db.example.com:5432/autotune",
        ["postgresql://u:***@db.example.com:5432/autotune"],
    ),
    ("postgresql+psycopg://u:secretpw@127.0.0.1/db", ["u:***@127.0.0.1/db"]),
    ("postgresql://u:secretpw@127.0.0.1:notaport/db", ["u:***@127.0.0.1:notaport/db"]),
    ("postgresql://u:secretpw@[::1/db", ["u:***@[::1/db"]),
    ("postgresql://u:secretpw@[::1]:5432/db", ["u:***@[::1]:5432/db"]),
    ("postgresql://u:secretpw@h@host/db", ["u:***@host/db"]),  # '@' in the password
    ("postgresql://u:se@cretpw@host/db", ["u:***@host/db"]),
    ("postgresql://u:secretpw:x@host/db", ["u:***@host/db"]),  # ':'
    ("postgresql://u:secretpw/x/y@host/db", ["u:***@host/db"]),  # '/'
    ("postgresql://u:s%40ecretpw@host/db", ["u:***@host/db"]),  # percent-encoded
    ("postgresql://u:secretpw%3A%2F@host/db", ["u:***@host/db"]),
    ("postgresql://u:secretpw two@host/db", ["u:***@host/db"]),  # a typed space
    ("postgresql://:secretpw@host/db", ["://:***@host/db"]),
    ("//u:secretpw@host/db", ["//u:***@host/db"]),
    ("cannot parse 'postgresql://u:secretpw@[::1/db' as a database URL", ["'postgresql://u:***@[::1/db'"]),
    ("cannot connect to postgresql://u:secretpw@h/db: timeout expired", ["u:***@h/db: timeout expired"]),
    ("a postgresql://a:secretpw@h1/x and mysql://b:secretpw@h2/y", ["a:***@h1/x and", "b:***@h2/y"]),
    ("postgresql://u@h/db?password=secretpw&sslmode=require", ["u@h/db?password=***&sslmode=require"]),
    ("postgresql://u@h/db?sslmode=require&PassWord=secretpw", ["?sslmode=require&PassWord=***"]),
    ("postgresql://u@h/db?passwd=secretpw", ["?passwd=***"]),
    ("postgresql://u@h/db?pwd=secretpw;x=1", ["?pwd=***"]),  # runs to &: a password may hold ";"
    ("postgresql://u@h/db?sslpassword=secretpw", ["?sslpassword=***"]),
    ("https://api.example.com/v1?TOKEN=secretpw&q=1", ["api.example.com/v1?TOKEN=***&q=1"]),
    ("https://api.example.com/v1?api_key=secretpw", ["?api_key=***"]),
    ("https://api.example.com/v1?Secret=secretpw", ["?Secret=***"]),
    ("https://api.example.com/v1?client_secret=secretpw", ["?client_secret=***"]),
    ("'postgresql://u@h/db?password=secretpw'", ["?password=***'"]),
    ("host=h password='secretpw two' dbname=x", ["host=h password=*** dbname=x"]),
    ("postgresql://u@h/db?password=sec'retpw", ["?password=***"]),
]


@pytest.mark.parametrize(("text", "readable"), CASES)
def test_secrets_are_masked_and_the_rest_stays_readable(text: str, readable: list[str]) -> None:
    masked = mask_secrets(text)
    assert "secretpw" not in masked and "cretpw" not in masked
    for part in readable:
        assert part in masked
    assert mask_secrets(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////tmp/autotune.db",
        "sqlite:////tmp/a:b@c.db",
        "sqlite:///C:/x@y.db",
        "postgresql://u@h:5432/db",
        'postgresql://localhost:5432/db: role "a@b" does not exist',
        'password authentication failed for user "u"',
        "tokens_per_s=1.5e4 passwords=2",
    ],
)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert mask_secrets(text) == text


def test_it_imports_without_sqlalchemy() -> None:
    code = "import sys, autotune.redact; assert 'sqlalchemy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
