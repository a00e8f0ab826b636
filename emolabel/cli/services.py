"""`emolabel services status|stop`: the background processes of the embedded default.

The embedded Redis runs as a daemon between commands (queued chunks wait in it); a local worker
may outlive a killed command. These show them and stop them; a configured broker
(`EMOLABEL_BROKER_URL`) is someone else's and is never stopped.
"""

from __future__ import annotations

import typer

from emolabel.cli.app import app, console, safe_url, settings_from

services_app = typer.Typer(
    help="The embedded default's background processes: status, stop.", no_args_is_help=True
)
app.add_typer(services_app, name="services")


@services_app.command("status")
def services_status() -> None:
    """What the embedded default runs in EMOLABEL_HOME (Redis, local workers)."""
    from emolabel.embedded import redis_server_executable, running_services

    settings = settings_from()
    if not settings.embedded_broker:
        console.print(
            f"broker: {safe_url(settings.effective_broker_url)} (configured; not ours to stop)",
            highlight=False,
        )
    services = running_services(settings)
    for service in services:
        console.print(
            f"{service.name}: pid {service.pid} ({service.detail})", highlight=False, soft_wrap=True
        )
    if not services:
        console.print(f"nothing running in {settings.home.resolve()}", highlight=False)
    if settings.embedded_broker:
        console.print(
            f"server binary: {redis_server_executable() or 'none found'}",
            highlight=False,
            soft_wrap=True,
        )


@services_app.command("stop")
def services_stop(
    timeout: float = typer.Option(30.0, min=0, help="Seconds a worker may take to finish."),
) -> None:
    """Stop the local workers (each finishes its chunk) and the embedded Redis (queued chunks
    are kept in its append-only file for the next start)."""
    from emolabel.embedded import stop_services

    settings = settings_from()
    stopped = stop_services(settings, timeout=timeout)
    for service in stopped:
        console.print(f"stopped {service.name} (pid {service.pid})", highlight=False)
    if not stopped:
        console.print(f"nothing running in {settings.home.resolve()}", highlight=False)
