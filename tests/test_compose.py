"""docker-compose.yml, the Dockerfile and .env.example, checked without a Docker engine.

The compose file is parsed with PyYAML (anchors and merge keys resolved as compose resolves them).
Every command a service or a healthcheck runs is checked against the real command line: the exact
argument list with `--help` added must succeed (an unknown option fails the parse first), and each
option it uses must appear in that help, so a renamed option fails here rather than in production.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values
from sqlalchemy.engine import make_url

from core.settings import Settings, WorkerSettings, iter_setting_rows
from tests.support.paths import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
EMOLABEL_SERVICES = {"migrate", "worker", "retrainer", "beat", "flower", "producer"}
LONG_RUNNING = {"redis", "postgres", "worker", "retrainer", "beat", "flower"}
ONE_SHOT = {"migrate", "producer"}
# Wide, plain help text: option names are never cut or wrapped.
PLAIN_HELP = {
    "COLUMNS": "200",
    "TERM": "dumb",
    "NO_COLOR": "1",
    "_TYPER_FORCE_DISABLE_TERMINAL": "1",
}


def argv(command: str | list[str]) -> list[str]:
    """A compose command (string or list) as arguments; `$$` is compose's escaped `$`."""
    words = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
    return [word.replace("$$", "$") for word in words]


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return argv(test)
    kind, *rest = test
    if kind == "CMD-SHELL":
        return argv(" ".join(rest))
    assert kind == "CMD", test
    return argv(rest)


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """name -> condition; the list form (no condition) is refused."""
    dependencies = service.get("depends_on", {})
    assert isinstance(dependencies, dict), "depends_on must name a condition for each service"
    return {name: entry["condition"] for name, entry in dependencies.items()}


def pairs(words: list[str]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(words))


def named_volume(mount: str, target: str) -> str | None:
    """The named volume mounted at `target`, or None (a bind mount or another target)."""
    source, _, rest = mount.partition(":")
    if rest.split(":")[0] != target or source.startswith((".", "/", "$")):
        return None
    return source


# Compose's interpolation: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error} and more.
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
ESCAPED_DOLLAR = "\0"


def interpolate(text: str, variables: dict[str, str | None]) -> str:
    """`text` with compose's `${...}` filled from `variables`; ValueError where compose refuses."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        value = variables.get(name)
        unset = value is None or (operator is not None and operator[0] == ":" and value == "")
        if operator is not None and operator[-1] == "?" and unset:
            raise ValueError(f"{name}: {argument}")
        if operator is not None and operator[-1] == "-" and unset:
            return str(argument)
        return value or ""

    # `$$` stays `$$` (for `argv` to turn into `$`) and is never the start of a variable.
    return INTERPOLATION.sub(one, text.replace("$$", ESCAPED_DOLLAR)).replace(ESCAPED_DOLLAR, "$$")


def compose_with(variables: dict[str, str | None]) -> dict[str, Any]:
    """The compose file as compose sees it with `variables` in `.env`."""
    parsed: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), variables))
    return parsed


def duration_seconds(duration: str) -> float:
    """A compose duration (`90s`, `16m`, `1h30m`, `1m30.5s`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def runs(words: list[str], program: str, command: str) -> bool:
    """True when `words` runs `program ... command` (emolabel beat, celery -A worker beat)."""
    if not words or Path(words[0]).name != program:
        return False
    return command in [word for word in words[1:] if not word.startswith("-")][:3]


# --- the services and their properties -------------------------------------------------------


def test_every_service_of_the_deployment_is_there() -> None:
    assert set(SERVICES) >= EMOLABEL_SERVICES | {"redis", "postgres"}


def test_redis_keeps_the_queue_across_restarts_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    assert str(redis["image"]).startswith("redis:7")
    words = argv(redis["command"])
    assert words[0] == "redis-server"
    assert {
        ("--appendonly", "yes"),
        ("--appendfsync", "everysec"),
        ("--maxmemory-policy", "noeviction"),
    } <= pairs(words)
    volumes = {named_volume(mount, "/data") for mount in redis["volumes"]} - {None}
    assert volumes and volumes <= set(COMPOSE["volumes"])
    assert "redis-cli ping" in " ".join(healthcheck_argv(redis))


def test_redis_asks_for_a_password_that_compose_requires() -> None:
    password = "from-dot-env-7f3a"
    compose = compose_with({**dotenv_values(ENV_EXAMPLE), "REDIS_PASSWORD": password})
    redis = compose["services"]["redis"]
    assert ("--requirepass", password) in pairs(argv(redis["command"]))
    # The healthcheck's redis-cli authenticates through REDISCLI_AUTH, never on its command line.
    assert redis["environment"]["REDISCLI_AUTH"] == password
    assert password not in " ".join(healthcheck_argv(redis))
    # No default password: every use of the variable makes compose stop when it is unset or
    # empty, and the example leaves it empty, so nothing that works is committed.
    uses = re.findall(r"\$\{REDIS_PASSWORD([^}]*)\}", COMPOSE_FILE.read_text())
    assert uses and all(use.startswith(":?") for use in uses), uses
    assert dotenv_values(ENV_EXAMPLE)["REDIS_PASSWORD"] == ""
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose_with(dict(dotenv_values(ENV_EXAMPLE)))


def test_every_service_reaches_the_broker_with_the_password() -> None:
    password = "from-dot-env-7f3a"
    env_file = {**dotenv_values(ENV_EXAMPLE), "REDIS_PASSWORD": password}
    services = compose_with(env_file)["services"]
    clients = {
        name
        for name, service in services.items()
        if Path(argv(service.get("command", ["-"]))[0]).name in {"emolabel", "celery"}
    }
    assert clients >= EMOLABEL_SERVICES
    for name in clients:
        environment = {**env_file, **services[name].get("environment", {})}
        url = urlsplit(str(environment.get("EMOLABEL_BROKER_URL")))
        assert (url.scheme, url.hostname, url.password) == ("redis", "redis", password), name


def test_workers_outlast_the_task_time_limit_when_stopped() -> None:
    """docker stop waits stop_grace_period before its SIGKILL, which would cut a chunk short."""
    limit = Settings(_env_file=ENV_EXAMPLE).worker.task_time_limit
    assert limit >= WorkerSettings.model_fields["task_time_limit"].default
    workers = [
        name
        for name, service in SERVICES.items()
        if runs(argv(service.get("command", [])), "emolabel", "worker")
        or runs(argv(service.get("command", [])), "celery", "worker")
    ]
    assert "worker" in workers
    for name in workers:
        grace = duration_seconds(str(SERVICES[name].get("stop_grace_period", "10s")))
        # A minute beyond the limit: the child is killed at the limit, then the chunk's message
        # goes back and the worker exits.
        assert grace >= limit + 60, (name, grace, limit)


def test_postgres_keeps_its_data_in_a_volume_and_reports_ready() -> None:
    postgres = SERVICES["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    data = {named_volume(mount, "/var/lib/postgresql/data") for mount in postgres["volumes"]}
    assert data - {None} and data - {None} <= set(COMPOSE["volumes"])
    assert healthcheck_argv(postgres)[0] == "pg_isready"
    assert postgres["env_file"] == ".env"


def test_migrate_runs_once_and_gates_the_services_that_need_the_schema() -> None:
    migrate = SERVICES["migrate"]
    assert argv(migrate["command"]) == ["emolabel", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    for name in ("worker", "producer"):
        assert depends_on(SERVICES[name]) == {
            "redis": "service_healthy",
            "postgres": "service_healthy",
            "migrate": "service_completed_successfully",
        }, name


def test_workers_scale_and_reserve_the_gpus() -> None:
    worker = SERVICES["worker"]
    assert runs(argv(worker["command"]), "emolabel", "worker")
    assert "container_name" not in worker  # `--scale worker=N` needs names compose chooses
    assert "replicas" not in worker.get("deploy", {})
    assert "ports" not in worker  # a fixed host port would stop the second replica
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device["driver"] == "nvidia"
        and "gpu" in device["capabilities"]
        and (device.get("count") in ("all", 1) or device.get("device_ids"))
        for device in devices
    ), devices
    assert "healthcheck" in worker


def mount_of(service: dict[str, Any], target: str) -> tuple[str, str] | None:
    """(source, options) of the bind mount at `target` ("" when none are given), or None."""
    for mount in service.get("volumes", []):
        # The source may be `${VARIABLE:-default}`, whose `:-` is no separator.
        match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(.*))?", str(mount))
        if match and match[2] == target:
            return match[1], match[3] or ""
    return None


def test_retraining_has_its_own_service_and_nothing_else_consumes_its_queue() -> None:
    retrainer = SERVICES["retrainer"]
    words = argv(retrainer["command"])
    assert runs(words, "emolabel", "worker") and "--retrain" in words
    assert "--concurrency" not in words  # a retrainer always runs one process
    assert "container_name" in retrainer  # exactly one
    assert "healthcheck" in retrainer
    # The only service that may write artifacts; its training data is read-only.
    assert mount_of(retrainer, "/models") == ("${MODELS_HOST_DIR:-./models}", "rw")
    training = mount_of(retrainer, "/data/training")
    assert training is not None and training[1] == "ro"
    for name, service in SERVICES.items():
        command = argv(service.get("command", []))
        if name == "retrainer":
            continue
        assert "--retrain" not in command, name
        # `emolabel worker` consumes the labeling queue alone unless given --retrain.
        assert not any("retrain" in word for word in command if word not in {"retrain"}), name


def test_exactly_one_beat() -> None:
    beats = [
        name
        for name, service in SERVICES.items()
        if "command" in service
        and (
            runs(argv(service["command"]), "emolabel", "beat")
            or runs(argv(service["command"]), "celery", "beat")
        )
    ]
    assert beats == ["beat"]
    assert "container_name" in SERVICES["beat"]  # compose refuses to scale it past one
    assert SERVICES["beat"].get("deploy", {}).get("replicas", 1) == 1
    for name, service in SERVICES.items():
        words = argv(service.get("command", []))
        assert "--beat" not in words and "-B" not in words, f"{name} embeds a second scheduler"


def test_only_flower_is_published_and_only_on_loopback() -> None:
    published = {name: service["ports"] for name, service in SERVICES.items() if "ports" in service}
    assert set(published) == {"flower"}
    for port in published["flower"]:
        assert str(port).startswith("127.0.0.1:"), port
    assert "127.0.0.1:5555:5555" in published["flower"]
    assert runs(argv(SERVICES["flower"]["command"]), "emolabel", "flower")


def test_the_producer_runs_only_when_asked() -> None:
    producer = SERVICES["producer"]
    assert producer["profiles"] == ["producer"]
    assert runs(argv(producer["command"]), "emolabel", "scan")
    assert producer["restart"] == "no"


def test_settings_health_and_dependencies_everywhere() -> None:
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        if name in EMOLABEL_SERVICES:
            assert service["env_file"] == ".env", name
            assert service["build"]["context"] == ".", name
        if name in LONG_RUNNING:
            assert healthcheck_argv(service), name
            assert service["restart"] == "unless-stopped", name
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
        for dependency, condition in depends_on(service).items():
            assert dependency in SERVICES, (name, dependency)
            wanted = (
                "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            )
            assert condition == wanted, (name, dependency)
        for mount in service.get("volumes", []):
            source = mount.partition(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, (name, mount)


# The one service that writes model artifacts: the dedicated retrainer.
WRITES_MODELS = {"retrainer"}


def models_mount_mode(mount: str) -> str | None:
    """ "ro"/"rw" for a mount of the models folder at /models, None for any other mount."""
    # The source may hold `${VAR:-default}`, so the target is found from the right.
    match = re.search(r":/models(?::(\w+))?$", mount)
    if match is None:
        return None
    return "ro" if match.group(1) == "ro" else "rw"


def test_the_models_folder_is_read_only_except_where_models_are_written() -> None:
    mounted = {
        name: {models_mount_mode(mount) for mount in service.get("volumes", [])} - {None}
        for name, service in SERVICES.items()
    }
    assert mounted["worker"] == {"ro"}, mounted
    assert mounted["retrainer"] == {"rw"}, mounted
    for name, modes in mounted.items():
        assert modes <= ({"rw"} if name in WRITES_MODELS else {"ro"}), (name, modes)


def test_every_variable_the_compose_file_uses_is_in_env_example() -> None:
    text = re.sub(r"\$\$", "", COMPOSE_FILE.read_text())  # `$$` is a literal dollar
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(dotenv_values(ENV_EXAMPLE)), sorted(used - set(dotenv_values(ENV_EXAMPLE)))


def test_env_example_holds_real_settings_that_validate() -> None:
    values = dotenv_values(ENV_EXAMPLE)
    known = {variable for variable, _, _ in iter_setting_rows()}
    ours = {name for name in values if name.startswith("EMOLABEL_")}
    assert ours - known == set(), "unknown settings in .env.example"
    settings = Settings(_env_file=ENV_EXAMPLE)
    assert settings.flower.user and settings.flower.password
    # The compose file makes the broker URL from REDIS_PASSWORD; one in .env would be ignored.
    assert "EMOLABEL_BROKER_URL" not in values
    database = make_url(str(settings.database_url))
    assert database.drivername == "postgresql+psycopg"
    assert database.host == "postgres"
    assert (database.username, database.password, database.database) == (
        values["POSTGRES_USER"],
        values["POSTGRES_PASSWORD"],
        values["POSTGRES_DB"],
    )


def test_the_image_is_slim_installs_postgres_and_runs_as_a_user() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    assert "FROM python:3.11-slim" in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert 'pip install ".[postgres]"' in DOCKERFILE.read_text()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    assert {pattern.rstrip("*") for pattern in packages} <= copied
    for source in copied - {"pyproject.toml", "README.md"}:
        assert (REPO / source).is_dir(), source


# --- every command against the real command line ---------------------------------------------


def commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every service command and healthcheck that runs emolabel or celery."""
    for name, service in SERVICES.items():
        if "command" in service:
            yield f"{name}.command", argv(service["command"])
        if "healthcheck" in service:
            yield f"{name}.healthcheck", healthcheck_argv(service)


def option_names(words: list[str]) -> list[str]:
    return [word.split("=")[0] for word in words if word.startswith("-") and word != "-c"]


def help_of(words: list[str]) -> str:
    """Run the command with `--help` added; fail the test unless it succeeds."""
    if words[0] == "emolabel":
        line = [sys.executable, "-m", "emolabel", *words[1:], "--help"]
    else:
        assert words[:3] == ["celery", "-A", "worker"], words
        line = [sys.executable, "-m", "celery", *words[1:], "--help"]
    done = subprocess.run(
        line,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **PLAIN_HELP},
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{shlex.join(words)} --help: {done.stderr}{done.stdout}"
    return done.stdout


def check_python_snippet(words: list[str]) -> None:
    """`python -c CODE`: the code parses and every name it imports exists."""
    assert words[:2] == ["python", "-c"], words
    tree = ast.parse(words[2])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "words"), [pytest.param(where, words, id=where) for where, words in commands()]
)
def test_commands_match_the_real_command_line(where: str, words: list[str]) -> None:
    program = Path(words[0]).name
    if program in {"redis-server", "redis-cli", "pg_isready"}:
        return  # the images' own tools; their options are checked above
    if program == "python":
        check_python_snippet(words)
        return
    assert program in {"emolabel", "celery"}, f"{where}: unexpected program {words[0]}"
    text = help_of(words)
    for option in option_names(words[3:] if program == "celery" else words[1:]):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
            f"{where}: {option} is not an option of `{shlex.join(words[:2])}`:\n{text}"
        )


def test_the_command_check_sees_every_emolabel_command() -> None:
    seen = {tuple(words[:2]) for _, words in commands() if words[0] == "emolabel"}
    assert {
        ("emolabel", "db"),
        ("emolabel", "worker"),
        ("emolabel", "beat"),
        ("emolabel", "flower"),
        ("emolabel", "scan"),
    } <= seen
