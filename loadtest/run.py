"""The load-test driver behind `make loadtest` / `din loadtest`.

One call does what a user would do by hand: make sure a model bundle exists (train the
default one if not), start a Redis of its own and the ranking service locally unless `--host`
names a running one, load the users' histories, write the traffic's population file, run
locust headless, and turn its CSV into a summary, a PNG and a pass/fail verdict against
thresholds. `$REDIS_URL` is never read: loading replaces a Redis's data, so only an explicit
`--redis-url` points the run at an existing one. Everything lands in `out_dir` (default `reports/loadtest/`):

    locust_stats.csv, locust_stats_history.csv, locust_failures.csv   locust's own CSV
    report.html          locust's HTML report
    loadtest.png         latency percentiles and throughput over time
    summary.json         the numbers printed, plus the thresholds and what broke them
    population.json      the users and ads the traffic was drawn from
    service.log, locust.log

Every tool runs as a subprocess (`python -m service.cli ...`, `python -m locust ...`):
the same command lines a user or the compose file runs, and locust's gevent monkey
patching stays out of the caller's process.

    python -m loadtest.run run --duration 60 --users 10      # what `make loadtest` runs
    python -m loadtest.run population --data synthetic --out population.json

`din loadtest` is the same with `run` as the default subcommand: `din loadtest --users 10`
and `din loadtest run --users 10` are one command (`din` inserts `run` unless the first
argument names a subcommand).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadtest.summary import LoadTestSummary, Thresholds, check, format_summary, plot, read_history, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_BUNDLES = Path("artifacts/bundles")
DEFAULT_OUT = Path("reports/loadtest")
CSV_PREFIX = "locust"
POPULATION_FORMAT = 1  # the locustfile's Population.from_file reads this format
MAX_POPULATION_USERS = 200_000  # the most active ones; keeps the file small at 1M users

# the help of `din loadtest --help` (the run parser's): it names the other subcommand too
RUN_EPILOG = """\
`run` is the default subcommand: `din loadtest [run] [options]`.
The other subcommand:
  din loadtest population --data SPEC --out FILE
      write only the traffic's population file (the users and ads locust draws from), e.g.
      for a --host run or locust by hand (LOADTEST_POPULATION=FILE); see
      `din loadtest population --help`
"""


class LoadTestError(RuntimeError):
    """The run could not be made (bad input, no service, locust crashed); not a threshold verdict."""


@dataclass(frozen=True)
class LoadTestConfig:
    """What to run and what counts as passing. `host=None` starts the service locally."""

    host: str | None = None
    duration_s: float = 60.0
    users: int = 10
    spawn_rate: float = 10.0
    candidates: int = 200
    top_k: int = 0  # 0: rank every candidate
    user_rps: float = 3.0  # per locust user (30/s at 10 users, 60/s in the spike); 0: back to back
    tags: tuple[str, ...] = ("rank",)
    shape: str = "spike"  # or "steady": see RankingLoadShape in the locustfile
    out_dir: Path = DEFAULT_OUT
    max_failure_rate: float = 0.01
    max_p99_ms: float | None = None
    bundle: Path | None = None  # local service only; default: the newest in artifacts/bundles
    data: str = "synthetic"  # the population the store holds (and the traffic draws from)
    redis_url: str | None = None  # local service only; its data is replaced. None: a Redis started for the run
    seed: int = 0
    startup_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        """Checked before anything starts; the messages name the CLI flag, since that is what users type."""
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"--duration must be a number of seconds > 0, got {self.duration_s:g}")
        if self.users < 1:
            raise ValueError(f"--users must be >= 1, got {self.users}")
        if not self.spawn_rate > 0:
            raise ValueError(f"--spawn-rate must be > 0, got {self.spawn_rate:g}")
        if self.candidates < 1:
            raise ValueError(f"--candidates must be >= 1, got {self.candidates}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: rank every candidate), got {self.top_k}")
        if not self.user_rps >= 0:
            raise ValueError(f"--user-rps must be >= 0 (0: back to back), got {self.user_rps:g}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(f"--max-failure-rate must be in [0, 1], got {self.max_failure_rate:g}")
        if self.max_p99_ms is not None and not self.max_p99_ms > 0:
            raise ValueError(f"--max-p99-ms must be > 0, got {self.max_p99_ms:g}")
        if self.shape not in ("spike", "steady"):
            raise ValueError(f"--shape must be 'spike' or 'steady', got {self.shape!r}")
        if self.host is not None:
            url = urllib.parse.urlsplit(self.host)
            if url.scheme not in ("http", "https") or not url.netloc:
                # urllib would call it an "unknown url type" on every poll, which reads as "not ready yet"
                raise ValueError(f"--host must be a URL like http://HOST:PORT, got {self.host!r}")
            if self.redis_url is not None:  # it would be ignored: the service at --host reads its own Redis
                raise ValueError("--redis-url is for a local run (it loads that Redis); with --host the service uses its own")


@dataclass(frozen=True)
class LoadTestReport:
    summary: LoadTestSummary
    problems: list[str]
    out_dir: Path
    host: str
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems


# --- the traffic's population ----------------------------------------------------------


def write_population(log, path: str | Path, max_users: int = MAX_POPULATION_USERS) -> Path:
    """Users (most active first) and ads (item -> its most frequent category, popularity) of a log.

    The locustfile draws Zipf-like over the user order, and candidates by item popularity.
    `log` is a `model.data.log.BehaviourLog` (any object with int64 user_id/item_id/cate_id).
    """
    users, user_events = np.unique(np.asarray(log.user_id, dtype=np.int64), return_counts=True)
    order = np.lexsort((users, -user_events))[:max_users]  # most active first, ties by id
    pairs, pair_events = np.unique(
        np.stack([np.asarray(log.item_id, dtype=np.int64), np.asarray(log.cate_id, dtype=np.int64)], axis=1),
        axis=0,
        return_counts=True,
    )
    by_item = np.lexsort((-pair_events, pairs[:, 0]))  # per item, its most frequent pair first
    pairs, pair_events = pairs[by_item], pair_events[by_item]
    first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
    item_events = np.add.reduceat(pair_events, np.flatnonzero(first)) if pairs.size else pair_events
    payload = {
        "format": POPULATION_FORMAT,
        "source": getattr(log, "name", "log"),
        "users": users[order].tolist(),
        "user_events": user_events[order].tolist(),
        "items": pairs[first, 0].tolist(),
        "item_cates": pairs[first, 1].tolist(),
        "item_events": item_events.tolist(),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError as e:  # a file where a directory should be, no permission, a full disk
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise LoadTestError(f"cannot write the population file {path}: {_os_reason(e, path.parent)}") from None
    return path


def _os_reason(e: OSError, directory: Path) -> str:
    """Why `directory` could not be made or written, in words: a file in the way, else the OS's reason."""
    for p in (directory, *directory.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                return f"{p} is a file, not a directory"
            break
    reason = e.strerror or str(e) or type(e).__name__
    return f"{reason} ({e.filename})" if e.filename else reason


def population_from_spec(data: str, path: Path) -> Path:
    """The population file of a data SPEC; a SPEC that cannot be read is a LoadTestError (exit 2)."""
    from model.data.download import DownloadError
    from model.data.sources import load_source

    try:
        log = load_source(data)
    except (ValueError, OSError, DownloadError) as e:  # LogFormatError is a ValueError
        raise LoadTestError(f"cannot read --data {data!r}: {e}") from None
    if len(log.user_id) == 0:
        raise LoadTestError(f"--data {data!r}: the behaviour log is empty; the load test draws its users from it")
    return write_population(log, path)


# --- the local service -----------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    """A `din` command line run with this interpreter (works before the console script exists)."""
    return [sys.executable, "-m", "service.cli", *args]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _local_env(**extra: str) -> dict[str, str]:
    """The caller's environment for the processes a local run starts, less REDIS_CLUSTER:
    --redis-url says it all (redis+cluster:// for a cluster), and the run's own Redis is not one."""
    env = dict(os.environ) | extra
    env.pop("REDIS_CLUSTER", None)
    return env


def _run_logged(cmd: list[str], log: Path, what: str, timeout_s: float | None = None) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, env=_local_env())
    if result.returncode != 0:
        raise LoadTestError(f"{what} failed (exit {result.returncode}); the end of {log}:\n{_tail(log)}")


def ensure_bundle(bundle: Path | None, data: str) -> Path:
    """The bundle to serve: the given one, else the newest in artifacts/bundles, else a new one."""
    from model.bundle import BundleError, resolve_bundle_path

    try:
        return resolve_bundle_path(bundle or DEFAULT_BUNDLES)
    except BundleError as e:
        if bundle is not None:
            raise LoadTestError(f"--bundle: {e}") from None
    print(f"[loadtest] no bundle in {DEFAULT_BUNDLES}: training DIN on --data {data} first", file=sys.stderr)
    # in the terminal, not the log: the progress bar is how a user knows this takes minutes
    result = subprocess.run(_cli("train", "--data", data, "--model", "din", "--out", str(DEFAULT_BUNDLES)))
    if result.returncode != 0:
        raise LoadTestError(f"din train failed (exit {result.returncode}); see its output above")
    return resolve_bundle_path(DEFAULT_BUNDLES)


def _ready(url: str) -> str | None:
    """None when GET /readyz answers 200, else why not (the HTTP status, or the connection error)."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2.0) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as e:  # 503: up, not ready yet
        return f"HTTP {e.code}"
    except urllib.error.URLError as e:
        return _connection_error(e.reason)
    except OSError as e:  # a reset or a timeout while reading the answer
        return _connection_error(e)


def _connection_error(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"the host name does not resolve ({reason.strerror or reason})"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "no answer within 2 s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float, log: Path | None = None) -> None:
    """Poll GET /readyz until 200; fail early when the server process has exited.

    A timeout says the last answer or connection error, e.g. refused or a name that does not resolve.
    """
    deadline = time.monotonic() + timeout_s
    while (problem := _ready(url)) is not None:
        if proc is not None and proc.poll() is not None:
            raise LoadTestError(
                f"the service exited (code {proc.returncode}) before it was ready"
                + (f"; the end of {log}:\n{_tail(log)}" if log else "")
            )
        if time.monotonic() > deadline:
            raise LoadTestError(f"{url}/readyz did not answer 200 within {timeout_s:g} s (last: {problem})")
        time.sleep(0.25)


@contextlib.contextmanager
def start_local_service(
    bundle: Path, redis_url: str, log: Path, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 180.0,
    admin_token: str | None = None,
) -> Iterator[str]:
    """`din serve` in a subprocess until the block ends; yields its base URL once /readyz is 200.

    `admin_token` becomes its ADMIN_TOKEN: without one the service answers POST /events with 403.
    """
    from feature_store.embedded import free_port

    port = port or free_port(host)
    cmd = _cli("serve", "--bundle", str(bundle), "--host", host, "--port", str(port), "--redis-url", redis_url)
    f = log.open("a")
    f.write(f"$ {' '.join(cmd)}\n")
    f.flush()
    env = _local_env(**({"ADMIN_TOKEN": admin_token} if admin_token else {}))
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, proc, timeout_s, log)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        f.close()


@contextlib.contextmanager
def _redis_for_run(redis_url: str | None, data_dir: Path) -> Iterator[str]:
    """The Redis the run loads: the one explicitly given, else a throwaway one (no dump) stopped afterwards."""
    if redis_url:
        yield redis_url
        return
    from feature_store.embedded import EmbeddedRedis

    from feature_store.embedded import EmbeddedRedisError

    server = EmbeddedRedis(data_dir, persist=False)
    try:
        server.start()
    except EmbeddedRedisError as e:
        raise LoadTestError(f"the run's Redis under {data_dir}: {e}") from None
    try:
        yield server.url
    finally:
        server.stop(save=False)


# --- locust ----------------------------------------------------------------------------


def locust_command(config: LoadTestConfig, host: str, out_dir: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", host,
        "--users", str(config.users), "--spawn-rate", f"{config.spawn_rate:g}",
        "--run-time", f"{max(1, round(config.duration_s))}s", "--stop-timeout", "5",
        "--csv", str(out_dir / CSV_PREFIX), "--csv-full-history",
        "--html", str(out_dir / "report.html"),
        "--only-summary", "--loglevel", "INFO", "--logfile", str(out_dir / "locust.log"),
        "--exit-code-on-error", "0",
    ]  # fmt: skip
    if config.tags:
        cmd += ["--tags", *config.tags]
    return cmd


def locust_env(config: LoadTestConfig, population: Path | None, admin_token: str | None = None) -> dict[str, str]:
    """The locustfile's knobs; `admin_token` (the local service's) replaces any $ADMIN_TOKEN for POST /events."""
    env = dict(os.environ)
    env.update(
        LOADTEST_CANDIDATES=str(config.candidates),
        LOADTEST_TOP_K=str(config.top_k),
        LOADTEST_USER_RPS=f"{config.user_rps:g}",
        LOADTEST_SHAPE=config.shape,
        LOADTEST_SEED=str(config.seed),
    )
    if population is not None:
        env["LOADTEST_POPULATION"] = str(population)
    if admin_token:
        env["ADMIN_TOKEN"] = admin_token
    return env


def run_locust(
    config: LoadTestConfig, host: str, out_dir: Path, population: Path | None, admin_token: str | None = None
) -> None:
    cmd = locust_command(config, host, out_dir)
    console = out_dir / "locust.out"
    with console.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            result = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=locust_env(config, population, admin_token),
                timeout=config.duration_s + 120,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"locust did not stop within {config.duration_s + 120:.0f} s; see {console}") from None
    if result.returncode != 0:
        raise LoadTestError(f"locust exited with {result.returncode}; the end of {console}:\n{_tail(console)}")


# --- the whole run ---------------------------------------------------------------------


def peak_users(config: LoadTestConfig) -> int:
    """The most locust users the run reaches: RankingLoadShape's spike (LOADTEST_SPIKE_FACTOR x users)."""
    if config.shape != "spike":
        return config.users
    try:
        factor = float(os.environ.get("LOADTEST_SPIKE_FACTOR", "").strip() or 2.0)
    except ValueError:
        factor = 2.0  # the locustfile refuses it, so this run never gets to a plot
    return max(config.users, math.ceil(config.users * factor))


def plot_title(config: LoadTestConfig) -> str:
    """What the run did, from its config: endpoints, candidates, users and the spike's peak."""
    paths = {"rank": "/rank", "events": "/events"}
    endpoints = " + ".join(paths.get(t, t) for t in config.tags) or "/rank"
    peak = peak_users(config)
    users = f"{config.users} users" + (f", spike to {peak}" if peak > config.users else f" ({config.shape})")
    return f"POST {endpoints}, {config.candidates} candidates, {users}"


# Everything a run writes into out_dir (and the locust CSVs, f"{CSV_PREFIX}_*.csv"): removed when a
# run starts, so no file of an earlier run can be read as this one's result.
RESULT_FILES = ("summary.json", "report.html", "loadtest.png", "population.json", "service.log", "locust.log", "locust.out")


def _clear_results(out: Path) -> None:
    for stale in [*out.glob(f"{CSV_PREFIX}_*.csv"), *(out / name for name in RESULT_FILES)]:
        stale.unlink(missing_ok=True)


def _config_json(config: LoadTestConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


def _write_failed_summary(out: Path, config: LoadTestConfig, error: BaseException) -> None:
    """summary.json of a run that ended before it had results: failed, and why."""
    reason = str(error) or type(error).__name__  # KeyboardInterrupt has no message
    payload = {"passed": False, "error": reason, "host": config.host or "local", "config": _config_json(config)}
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")


def run_loadtest(config: LoadTestConfig) -> LoadTestReport:
    """Run the load test the config describes; the report says whether it passed.

    The run's files replace the previous run's as a whole: they are removed first, and a run
    that fails before it has results leaves a summary.json with "passed": false and the error.
    """
    out = Path(config.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock_out(out)  # before the previous run's files go: they may be a running run's
    except OSError as e:  # --out names a file, a path under one, or a directory it may not write
        raise LoadTestError(f"--out {out}: cannot hold the run's reports: {_os_reason(e, out)}") from None
    try:
        _clear_results(out)
        return _run(config, out)
    except BaseException as e:
        if not (out / "summary.json").exists():
            _write_failed_summary(out, config, e)
        raise
    finally:
        os.close(lock)


def _lock_out(out: Path) -> int:
    """An flock on `out` for the run's life: a second run into the same --out is refused, not mixed in."""
    import fcntl

    fd = os.open(out / ".loadtest.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LoadTestError(f"--out {out}: another din loadtest (pid {holder}) is writing there; "
                            "wait for it, or pass another --out") from None  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _run(config: LoadTestConfig, out: Path) -> LoadTestReport:
    service_log = out / "service.log"
    service_log.write_text("")
    # a mistyped --bundle fails now, not after the data is read
    bundle = ensure_bundle(config.bundle, config.data) if config.host is None and config.bundle else None
    population = population_from_spec(config.data, out / "population.json")

    admin_token = None  # --host: locust sends $ADMIN_TOKEN, if set, to POST /events
    with contextlib.ExitStack() as stack:
        host = config.host
        if host is None:
            bundle = bundle or ensure_bundle(config.bundle, config.data)
            redis_url = stack.enter_context(_redis_for_run(config.redis_url, out / "redis"))
            _run_logged(
                _cli("load", "--bundle", str(bundle), "--data", config.data, "--redis-url", redis_url),
                service_log, "din load",
            )  # fmt: skip
            # one per run, shared by the service and locust, so `--tags rank events` works without setup
            admin_token = secrets.token_urlsafe(24)
            host = stack.enter_context(
                start_local_service(
                    bundle, redis_url, service_log, timeout_s=config.startup_timeout_s, admin_token=admin_token
                )
            )
        else:
            host = host.rstrip("/")
            wait_ready(host, None, timeout_s=30.0)
        print(f"[loadtest] {config.duration_s:g} s against {host}, {config.users} users", file=sys.stderr)
        run_locust(config, host, out, population, admin_token)

    summary = summarize(out / CSV_PREFIX)
    problems = check(summary, Thresholds(config.max_failure_rate, config.max_p99_ms))
    png = plot(
        read_history(out / f"{CSV_PREFIX}_stats_history.csv"),
        out / "loadtest.png",
        title=plot_title(config),
    )
    summary_json = out / "summary.json"
    summary_json.write_text(
        json.dumps(
            summary.to_dict()
            | {
                "problems": problems,
                "passed": not problems,
                "host": host if config.host else "local",
                "config": _config_json(config),
            },
            indent=2,
        )
        + "\n"
    )
    return LoadTestReport(
        summary=summary,
        problems=problems,
        out_dir=out,
        host=host,
        files={
            "stats": out / f"{CSV_PREFIX}_stats.csv",
            "history": out / f"{CSV_PREFIX}_stats_history.csv",
            "html": out / "report.html",
            "plot": png,
            "summary": summary_json,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="din loadtest", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = LoadTestConfig()
    run = sub.add_parser(
        "run", prog="din loadtest", help="run the load test (starts the service unless --host)",
        description="Run the load test: locust headless against the service (started locally\n"
        "unless --host), then a summary, a plot and a pass/fail verdict.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    run.add_argument("--host", default=None, help="a running service, e.g. http://127.0.0.1:8000")
    run.add_argument("--duration", type=float, default=d.duration_s, help="seconds")
    run.add_argument("--users", type=int, default=d.users)
    run.add_argument("--spawn-rate", type=float, default=d.spawn_rate)
    run.add_argument("--candidates", type=int, default=d.candidates)
    run.add_argument("--top-k", type=int, default=d.top_k)
    run.add_argument("--user-rps", type=float, default=d.user_rps)
    run.add_argument("--tags", nargs="+", default=list(d.tags))
    run.add_argument("--shape", choices=("spike", "steady"), default=d.shape)
    run.add_argument("--out", type=Path, default=d.out_dir)
    run.add_argument("--max-failure-rate", type=float, default=d.max_failure_rate)
    run.add_argument("--max-p99-ms", type=float, default=None)
    run.add_argument("--bundle", type=Path, default=None)
    run.add_argument("--data", default=d.data)
    run.add_argument(
        "--redis-url", default=None, metavar="URL",
        help="load the run's data into this Redis instead of starting one; its data is REPLACED "
        "($REDIS_URL is not read). Refused with --host (exit 2)",
    )  # fmt: skip
    pop = sub.add_parser(
        "population", prog="din loadtest population", help="write the traffic's population file from a data SPEC"
    )
    pop.add_argument("--data", default="synthetic")
    pop.add_argument("--out", type=Path, required=True)
    # A subcommand's arguments are parsed by its own parser: an unknown option is then refused with
    # that command's usage (`din loadtest [-h] [--host HOST] ...`), not the top level's `{run,population}`,
    # which `din loadtest` does not take (it inserts `run` itself).
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["run"], ["population"]):
        args = (run if argv[0] == "run" else pop).parse_args(argv[1:], argparse.Namespace(command=argv[0]))
    else:
        args = parser.parse_args(argv)

    # bad input is exit 2 with one line, like a run that could not be made; 1 means a broken threshold
    try:
        if args.command == "population":
            print(str(population_from_spec(args.data, args.out)))
            return 0
        try:
            config = LoadTestConfig(
                host=args.host, duration_s=args.duration, users=args.users, spawn_rate=args.spawn_rate,
                candidates=args.candidates, top_k=args.top_k, user_rps=args.user_rps, tags=tuple(args.tags),
                shape=args.shape, out_dir=args.out, max_failure_rate=args.max_failure_rate,
                max_p99_ms=args.max_p99_ms, bundle=args.bundle, data=args.data, redis_url=args.redis_url,
            )  # fmt: skip
        except ValueError as e:
            raise LoadTestError(str(e)) from None
        report = run_loadtest(config)
    except LoadTestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report.summary, report.problems))
    print(f"report: {report.files['html']}\nplot:   {report.files['plot']}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
