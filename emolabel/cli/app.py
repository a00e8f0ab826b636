"""The command line's floor: the Typer app every command module registers into, its output
helpers, and the connections a command opens (database sessions, the broker, a Celery app).

Command modules (`data`, `models`, `pipeline`) import this module and add their commands to
`app`; `emolabel.cli.main` imports them all and runs the app, so nothing imports back up.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, load_settings

app = typer.Typer(
    name="emolabel",
    help="Label huge photo archives with a Keras image classifier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

EXIT_FAILURE = 1
EXIT_PARTIAL = 3


def fail(message: str) -> NoReturn:
    """Print one clear line and exit non-zero."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_FAILURE)


def settings_from(**overrides: Any) -> Settings:
    return load_settings(**{key: value for key, value in overrides.items() if value is not None})


def prepare_process() -> None:
    # TensorFlow prints C++ start-up chatter before Python logging exists; only the environment
    # silences it, so the entry point sets a default the user can still override.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def progress_line(message: str) -> None:
    console.print(f"[dim]·[/] {message}", highlight=False)


def split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    from db.session import make_engine, make_sessionmaker, ready_schema

    url = settings.effective_database_url
    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
        ready_schema(url, migrate=True)
    else:
        try:
            # The revision only: the full comparison with the models is `emolabel db check`.
            ready_schema(url, migrate=False)
        except Exception as error:  # SchemaMismatchError or a connection error: one line either way
            fail(
                f"database {safe_url(url)} is not ready ({first_line(error, url)}); "
                "run `emolabel db upgrade`"
            )
    return make_sessionmaker(make_engine(url))


def safe_url(url: str) -> str:
    from core.redaction import mask_url

    return mask_url(url)


def first_line(error: BaseException, url: str) -> str:
    """The first line of an error about the database at `url`, without its password."""
    from core.redaction import mask_urls_in_text, redact

    lines = str(error).strip().splitlines() or [type(error).__name__]
    return mask_urls_in_text(redact(lines[0], url))


def broker_for(settings: Settings) -> None:
    from emolabel.embedded import ensure_redis

    ensure_redis(settings)


def celery_for(settings: Settings) -> Any:
    from worker.celery_app import make_celery

    return make_celery(settings)
