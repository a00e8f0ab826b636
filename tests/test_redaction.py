"""Passwords never reach the output: `emolabel settings`, error lines, and the masking helper.

The command-line tests run the real `emolabel` in a subprocess with hostile URLs (a password that
is not percent-encoded, one in the query string) and look for every piece of every secret in all
it printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.redaction import mask_url, mask_urls, mask_urls_in_text, redact
from tests.support.cli import run_cli

# Two halves each, both unlike any other word the output may hold.
DATABASE_PASSWORD = "Hunter2Qz-Xk4Lmw"
BROKER_PASSWORD = "Swordf1sh-Jq7Vzt"
S3_SECRET = "W0lframK-Zp3Rqv"
FLOWER_PASSWORD = "Gandalf9x-Yw2Nbc"
ENDPOINT_PASSWORD = "Mellon5Jr-Ht8Pkd"
SECRETS = [DATABASE_PASSWORD, BROKER_PASSWORD, S3_SECRET, FLOWER_PASSWORD, ENDPOINT_PASSWORD]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://default:pw@redis:6379/0", "redis://default:***@redis:6379/0"),
        (
            "rediss://:pw@redis:6380/0?ssl_cert_reqs=required",
            "rediss://:***@redis:6380/0?ssl_cert_reqs=required",
        ),
        ("postgresql+psycopg://u:pw@db:5432/x", "postgresql+psycopg://u:***@db:5432/x"),
        # Not percent-encoded: `@`, `/`, `?` and `#` inside the password.
        ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),
        ("redis://:s3/cr?e#t@redis:6379/0", "redis://:***@redis:6379/0"),
        ("postgresql://u:pw@db/x?password=pw2&sslmode=require", None),
        (
            "redis+socket:///run/redis.sock?password=pw",
            "redis+socket:///run/redis.sock?password=***",
        ),
        ("https://token@store.example", "https://***@store.example"),
        ("sqlite:////var/lib/emolabel.db", "sqlite:////var/lib/emolabel.db"),
        (
            "redis+socket:///home/u/.emolabel/redis.sock",
            "redis+socket:///home/u/.emolabel/redis.sock",
        ),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, shown: str | None) -> None:
    masked = mask_url(url)
    if shown is not None:
        assert masked == shown
    for secret in ("pw", "p@ss", "s3/cr", "token"):
        assert f":{secret}@" not in masked and f"={secret}" not in masked


def test_mask_url_never_raises_on_a_broken_url() -> None:
    # kombu's sanitizer raised here, quoting part of the password in its message.
    assert mask_url("redis://:s3cr/et@redis:port/0") == "redis://:***@redis:port/0"


def test_redact_removes_the_pieces_of_a_password_a_parser_quotes() -> None:
    url = "redis://:s3cret/Vq9xz@redis:6379/0"
    message = "Port could not be cast to integer value as 's3cret'"
    assert redact(message, url) == "Port could not be cast to integer value as '***'"
    assert redact("nothing to hide", "redis://redis:6379/0") == "nothing to hide"


def test_masking_inside_text_and_structures() -> None:
    text = "(psycopg) cannot connect to 'postgresql://u:pw@db/x': refused"
    assert (
        mask_urls_in_text(text) == "(psycopg) cannot connect to 'postgresql://u:***@db/x': refused"
    )
    nested = {"a": ["redis://:pw@h/0", 3], "b": {"c": "postgresql://u:pw@h/x"}, "d": None}
    assert mask_urls(nested) == {
        "a": ["redis://:***@h/0", 3],
        "b": {"c": "postgresql://u:***@h/x"},
        "d": None,
    }


# --- through the real command line ------------------------------------------------------------


def secret_environment(home: Path) -> dict[str, str]:
    return {
        "EMOLABEL_HOME": str(home),
        "EMOLABEL_DATABASE_URL": (
            f"postgresql+psycopg://emolabel:{DATABASE_PASSWORD}@127.0.0.1:1/emolabel"
            f"?sslmode=disable&password={DATABASE_PASSWORD}"
        ),
        "EMOLABEL_BROKER_URL": f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/0",
        "EMOLABEL_S3__ACCESS_KEY": "AKIDEXAMPLE",
        "EMOLABEL_S3__SECRET_KEY": S3_SECRET,
        "EMOLABEL_S3__ENDPOINT_URL": f"http://minio:{ENDPOINT_PASSWORD}@127.0.0.1:9000",
        "EMOLABEL_FLOWER__USER": "operator",
        "EMOLABEL_FLOWER__PASSWORD": FLOWER_PASSWORD,
    }


def assert_no_secret(output: str, secrets: list[str] = SECRETS) -> None:
    for secret in secrets:
        assert secret not in output, f"{secret} printed:\n{output}"
        # and no piece of it either (a parser's message quotes the piece it choked on)
        for piece in secret.split("-"):
            assert piece not in output, f"{piece} of {secret} printed:\n{output}"


def test_settings_shows_urls_without_their_passwords(tmp_path: Path) -> None:
    done = run_cli(["settings"], env=secret_environment(tmp_path))
    assert done.returncode == 0, done.stderr
    assert_no_secret(done.stdout + done.stderr)
    shown = json.loads(done.stdout)
    # Everything but the secrets is still there to check a deployment against.
    assert shown["database_url"] == (
        "postgresql+psycopg://emolabel:***@127.0.0.1:1/emolabel?sslmode=disable&password=***"
    )
    assert shown["broker_url"] == "redis://:***@127.0.0.1:1/0"
    assert shown["s3"]["endpoint_url"] == "http://minio:***@127.0.0.1:9000"
    assert shown["s3"]["access_key"] == "AKIDEXAMPLE"
    assert shown["flower"]["user"] == "operator"
    assert shown["s3"]["secret_key"] == shown["flower"]["password"] == "**********"


def test_the_settings_table_shows_no_secret(tmp_path: Path) -> None:
    done = run_cli(["settings", "--table"], env=secret_environment(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "EMOLABEL_BROKER_URL" in done.stdout
    assert_no_secret(done.stdout + done.stderr)


@pytest.mark.parametrize(
    "broker_url",
    [
        f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/0",  # nothing listens there
        # Not percent-encoded: the parser takes the password's start for a port and quotes it.
        f"redis://:{BROKER_PASSWORD.replace('-', '/')}@127.0.0.1:1/0",
        f"redis://:{BROKER_PASSWORD.replace('-', '@')}@127.0.0.1:1/0",
    ],
)
def test_broker_errors_show_no_password(tmp_path: Path, broker_url: str) -> None:
    environment = {**secret_environment(tmp_path), "EMOLABEL_BROKER_URL": broker_url}
    done = run_cli(["republish", "1"], env=environment)
    assert done.returncode == 1
    assert "broker" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert_no_secret(done.stdout + done.stderr)


@pytest.mark.parametrize(
    "database_url",
    [
        f"postgresql+psycopg://emolabel:{DATABASE_PASSWORD}@127.0.0.1:1/emolabel",
        f"postgresql+psycopg://emolabel:{DATABASE_PASSWORD.replace('-', '@')}@127.0.0.1:1/x",
        f"postgresql+psycopg://emolabel:{DATABASE_PASSWORD.replace('-', ':')}@127.0.0.1/x",
    ],
)
def test_database_errors_show_no_password(tmp_path: Path, database_url: str) -> None:
    environment = {**secret_environment(tmp_path), "EMOLABEL_DATABASE_URL": database_url}
    done = run_cli(["db", "check"], env=environment)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert_no_secret(done.stdout + done.stderr)
