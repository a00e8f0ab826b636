"""`emolabel review`: serve the review page, on loopback by default, never without credentials."""

from __future__ import annotations

import getpass
import ipaddress
from typing import Annotated

import typer

from emolabel.cli.app import app, console, errors, fail, sessions_for, settings_from

# getpass.getuser() has no answer in a container without a passwd entry or USER variable.
FALLBACK_REVIEWER = "reviewer"


def default_reviewer() -> str:
    """The OS user's name, else a generic one."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return FALLBACK_REVIEWER


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command()
def review(
    address: Annotated[
        str | None, typer.Option(help="Interface to listen on (default: EMOLABEL_REVIEW__ADDRESS).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port to listen on (default: EMOLABEL_REVIEW__PORT)."),
    ] = None,
    reviewer: Annotated[
        str | None,
        typer.Option(help="Who reviews with the printed token (default: the OS user)."),
    ] = None,
) -> None:
    """Serve the review page: accept or correct labels, most doubtful first.

    Log in with the URL it prints (a fresh token each start), or with basic authentication as
    EMOLABEL_FLOWER__USER / EMOLABEL_FLOWER__PASSWORD when they are set.
    """
    import uvicorn

    from emolabel.review.app import make_app
    from emolabel.review.auth import Credentials

    base = settings_from()
    chosen = {"address": address, "port": port}
    settings = base.model_copy(
        update={
            "review": base.review.model_copy(
                update={key: value for key, value in chosen.items() if value is not None}
            )
        }
    )
    name = (reviewer or default_reviewer()).strip()
    if not name:
        fail("--reviewer must not be empty")
    password = settings.flower.password
    credentials = Credentials.generate(
        name,
        basic_user=settings.flower.user,
        basic_password=password.get_secret_value() if password is not None else None,
    )
    web_app = make_app(settings, sessions_for(settings), credentials)
    host = settings.review.address
    shown_host = f"[{host}]" if ":" in host else host
    console.print(
        f"Review page: http://{shown_host}:{settings.review.port}/?token={credentials.token}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"Reviewing as {name}; Ctrl-C stops it.", highlight=False)
    if not _is_loopback(host):
        # The page speaks plain HTTP: off loopback, the token and passwords cross the network
        # in clear unless a TLS proxy stands in front.
        errors.print(
            f"warning: listening on {host}, not loopback: serve it behind a TLS proxy",
            highlight=False,
        )
    uvicorn.run(web_app, host=host, port=settings.review.port, log_level="warning")
