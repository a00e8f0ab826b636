"""The `emolabel` command line: one Typer app, one subcommand per job.

This is the output layer: it builds the settings, calls the library, and prints. An
`EmolabelError` becomes one line on stderr and exit status 1; usage errors exit 2 (Typer's).
Heavy imports (TensorFlow) happen inside the commands that need them, so `--help` is instant.
The app and its helpers live in `emolabel.cli.app`; importing the command modules here registers
their commands on it.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from core.errors import EmolabelError
from emolabel.cli import (  # noqa: F401
    data,
    models,
    pipeline,
    retention,
    review,
    services,
    sidecars,
)
from emolabel.cli.app import EXIT_FAILURE, app, errors, prepare_process


def main() -> None:
    """Console-script entry point."""
    prepare_process()
    try:
        app()
    except EmolabelError as error:
        errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
    except Exception as error:
        # Infrastructure failures (database, broker) still get one line; their type says where.
        from kombu.exceptions import OperationalError as BrokerError
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(error, SQLAlchemyError | BrokerError):
            raise
        from core.redaction import mask_urls_in_text

        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        first_line = mask_urls_in_text(first_line)
        kind = "database" if isinstance(error, SQLAlchemyError) else "broker"
        errors.print(f"[bold red]error:[/] {kind}: {escape(first_line)}", highlight=False)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()
