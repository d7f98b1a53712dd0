"""What a locust run measured, in numbers a CI pipeline can gate on, and a plot a person reads.

Reads locust's CSV output (`<prefix>_stats.csv`: totals per endpoint; `<prefix>_stats_history.csv`:
one row per second), computes requests/s, p50/p95/p99 and the failure rate, checks them
against thresholds, and draws latency percentiles and throughput over time as a PNG.

    python -m loadtest.summary reports/loadtest/locust --max-failure-rate 0.01 --max-p99-ms 250 \
        --plot reports/loadtest/loadtest.png

exits 1 when a threshold is exceeded (or nothing was measured), 2 on unreadable input.
Locust's percentiles come from its response-time histogram (2 significant digits), in ms.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

AGGREGATED = "Aggregated"
DEGRADED_SUFFIX = " [degraded]"  # the locustfile's name for correct-but-degraded answers


class SummaryError(ValueError):
    """A locust CSV that is missing or not in the shape locust writes; names the file."""


@dataclass(frozen=True)
class EndpointStats:
    """Totals of one endpoint (or of all of them: name "Aggregated") over the whole run."""

    method: str
    name: str
    requests: int
    failures: int
    rps: float
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class LoadTestSummary:
    total: EndpointStats
    endpoints: tuple[EndpointStats, ...]
    duration_s: float | None = None  # from the history CSV, when there is one

    @property
    def requests(self) -> int:
        return self.total.requests

    @property
    def failures(self) -> int:
        return self.total.failures

    @property
    def failure_rate(self) -> float:
        return self.total.failure_rate

    @property
    def rps(self) -> float:
        return self.total.rps

    @property
    def degraded(self) -> int:
        """Answers ranked without history (store timeout), counted apart by the locustfile."""
        return sum(e.requests for e in self.endpoints if e.name.endswith(DEGRADED_SUFFIX))

    @property
    def p50_ms(self) -> float:
        return self.total.p50_ms

    @property
    def p95_ms(self) -> float:
        return self.total.p95_ms

    @property
    def p99_ms(self) -> float:
        return self.total.p99_ms

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "failure_rate": self.failure_rate,
            "degraded": self.degraded,
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.total.max_ms,
            "duration_s": self.duration_s,
            "endpoints": [asdict(e) | {"failure_rate": e.failure_rate} for e in self.endpoints],
        }


@dataclass(frozen=True)
class Thresholds:
    """A run passes when failures / requests <= max_failure_rate and p99 <= max_p99_ms."""

    max_failure_rate: float = 0.01
    max_p99_ms: float | None = None  # None: latency is reported, not gated


@dataclass(frozen=True)
class History:
    """The per-second Aggregated rows: seconds since the first row, and what locust saw then.

    Percentiles here are locust's "current" ones (a sliding window of the last 10 s);
    NaN before the first response.
    """

    t_s: np.ndarray = field(repr=False)
    users: np.ndarray = field(repr=False)
    rps: np.ndarray = field(repr=False)
    failures_per_s: np.ndarray = field(repr=False)
    p50_ms: np.ndarray = field(repr=False)
    p95_ms: np.ndarray = field(repr=False)
    p99_ms: np.ndarray = field(repr=False)

    @property
    def duration_s(self) -> float:
        return float(self.t_s[-1]) if self.t_s.size else 0.0


def _number(row: dict[str, str], column: str, path: Path) -> float:
    raw = row.get(column)
    if raw is None:
        raise SummaryError(f"{path}: no column {column!r}; is this a locust --csv file?")
    if raw.strip() in ("", "N/A"):
        return math.nan
    try:
        return float(raw)
    except ValueError:
        raise SummaryError(f"{path}: column {column!r} holds {raw!r}, not a number") from None


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise SummaryError(f"{path}: not found; did locust run with --csv?") from None


def read_stats(path: str | Path) -> tuple[EndpointStats, ...]:
    """Every row of `<prefix>_stats.csv`, the Aggregated row last."""
    path = Path(path)
    stats = []
    for row in _rows(path):
        requests = _number(row, "Request Count", path)
        stats.append(
            EndpointStats(
                method=row.get("Type", ""),
                name=row.get("Name", ""),
                requests=int(requests) if not math.isnan(requests) else 0,
                failures=int(_number(row, "Failure Count", path) or 0),
                rps=_number(row, "Requests/s", path),
                avg_ms=_number(row, "Average Response Time", path),
                p50_ms=_number(row, "50%", path),
                p95_ms=_number(row, "95%", path),
                p99_ms=_number(row, "99%", path),
                max_ms=_number(row, "Max Response Time", path),
            )
        )
    if not stats or stats[-1].name != AGGREGATED:
        raise SummaryError(f"{path}: no {AGGREGATED!r} row; is this a locust _stats.csv file?")
    return tuple(stats)


def read_history(path: str | Path) -> History:
    """The Aggregated rows of `<prefix>_stats_history.csv`, in time order."""
    path = Path(path)
    rows = [r for r in _rows(path) if r.get("Name") == AGGREGATED]

    def col(name: str) -> np.ndarray:
        return np.array([_number(r, name, path) for r in rows], dtype=np.float64)

    t = col("Timestamp")
    return History(
        t_s=t - t[0] if t.size else t,
        users=col("User Count"),
        rps=col("Requests/s"),
        failures_per_s=col("Failures/s"),
        p50_ms=col("50%"),
        p95_ms=col("95%"),
        p99_ms=col("99%"),
    )


def summarize(prefix: str | Path) -> LoadTestSummary:
    """The summary of the run whose CSV files start with `prefix` (locust's --csv value)."""
    prefix = str(prefix)
    stats = read_stats(prefix + "_stats.csv")
    history_path = Path(prefix + "_stats_history.csv")
    duration = read_history(history_path).duration_s if history_path.exists() else None
    return LoadTestSummary(total=stats[-1], endpoints=stats[:-1], duration_s=duration)


def check(summary: LoadTestSummary, thresholds: Thresholds) -> list[str]:
    """The thresholds a run broke, as sentences; empty when it passes."""
    problems = []
    if summary.requests == 0:
        problems.append("no request completed: the service was not reached or the run was too short")
        return problems
    if summary.failure_rate > thresholds.max_failure_rate:
        problems.append(
            f"failure rate {summary.failure_rate:.2%} ({summary.failures} of {summary.requests}) "
            f"is above the limit {thresholds.max_failure_rate:.2%}"
        )
    if thresholds.max_p99_ms is not None:
        if math.isnan(summary.p99_ms):
            problems.append("p99 latency was not measured")
        elif summary.p99_ms > thresholds.max_p99_ms:
            problems.append(f"p99 latency {summary.p99_ms:.0f} ms is above the limit {thresholds.max_p99_ms:g} ms")
    return problems


def format_summary(summary: LoadTestSummary, problems: list[str] | None = None) -> str:
    """A few lines for a terminal or a CI log."""

    def line(e: EndpointStats) -> str:
        return (
            f"{(e.method + ' ' + e.name).strip():<24} {e.requests:>9d} {e.failure_rate:>8.2%} {e.rps:>9.1f} "
            f"{e.p50_ms:>7.0f} {e.p95_ms:>7.0f} {e.p99_ms:>7.0f} {e.max_ms:>8.0f}"
        )

    head = (
        f"{'endpoint':<24} {'requests':>9} {'failed':>8} {'req/s':>9} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>8}"
    )
    lines = [head, *(line(e) for e in summary.endpoints), line(summary.total)]
    if summary.degraded:
        share = summary.degraded / summary.requests
        lines.append(f"degraded (ranked without history): {summary.degraded} ({share:.2%})")
    if summary.duration_s is not None:
        lines.append(f"duration {summary.duration_s:.0f} s")
    if problems is not None:
        lines += [f"FAIL: {p}" for p in problems] if problems else ["PASS: every threshold met"]
    return "\n".join(lines)


def plot(history: History, png: str | Path, title: str = "Load test") -> Path:
    """Latency percentiles (top) and throughput with the user count (bottom) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig, (lat, thr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, constrained_layout=True)
    for values, label in ((history.p50_ms, "p50"), (history.p95_ms, "p95"), (history.p99_ms, "p99")):
        lat.plot(history.t_s, values, label=label)
    lat.set_ylabel("latency (ms, 10 s window)")
    lat.set_ylim(bottom=0)
    lat.legend(loc="upper left")
    lat.grid(alpha=0.3)
    lat.set_title(title)
    thr.plot(history.t_s, history.rps, label="requests/s", color="tab:green")
    thr.plot(history.t_s, history.failures_per_s, label="failures/s", color="tab:red")
    thr.set_ylabel("requests/s")
    thr.set_xlabel("time (s)")
    thr.set_ylim(bottom=0)
    thr.grid(alpha=0.3)
    users = thr.twinx()
    users.step(history.t_s, history.users, where="post", label="users", color="tab:gray", linestyle="--")
    users.set_ylabel("locust users")
    users.set_ylim(bottom=0)
    handles = thr.get_legend_handles_labels()[0] + users.get_legend_handles_labels()[0]
    thr.legend(handles=handles, loc="upper left")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="locust's --csv prefix, e.g. reports/loadtest/locust")
    parser.add_argument("--max-failure-rate", type=float, default=Thresholds.max_failure_rate)
    parser.add_argument("--max-p99-ms", type=float, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the run here")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.prefix)
        history_path = Path(args.prefix + "_stats_history.csv")
        if args.plot is not None:
            plot(read_history(history_path), args.plot)
    except SummaryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = check(summary, Thresholds(args.max_failure_rate, args.max_p99_ms))
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_dict() | {"problems": problems}, indent=2) + "\n")
    print(format_summary(summary, problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
