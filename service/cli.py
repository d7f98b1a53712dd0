"""`din`: one console entry point for every job a user runs.

Imports are lazy inside each command: `din serve` must start in the serving image, which
has no torch, and `din --help` should answer instantly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="din",
    help="Deep Interest Network CTR ranking: generate data, train, export, load features, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DIN_HOME = Path(os.environ.get("DIN_HOME", ".din"))
DEFAULT_BUNDLES = Path("artifacts/bundles")

RedisUrlOpt = Annotated[
    Optional[str],
    typer.Option("--redis-url", envvar="REDIS_URL", help="External Redis; default: the embedded one."),
]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="synthetic | events:PATH | movielens:PATH | amazon:PATH"),
]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _finite(obj):
    """NaN (e.g. GAUC on a split where every user has one class) -> null: strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _load_bundle(path: Path):
    from model.bundle import BundleError, load_bundle, resolve_bundle_path

    try:
        return load_bundle(resolve_bundle_path(path))
    except BundleError as e:
        _fail(str(e))


def _load_log(spec: str):
    from model.data.log import LogFormatError
    from model.data.sources import load_source

    try:
        return load_source(spec)
    except (LogFormatError, ValueError, FileNotFoundError) as e:
        _fail(f"cannot read --data {spec!r}: {e}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output Parquet file.")],
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 10_000,
    items: Annotated[int, typer.Option(min=1, help="Number of items (ads).")] = 5_000,
    categories: Annotated[int, typer.Option(min=1, help="Number of categories.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Generate a synthetic behaviour log (Parquet) with planted local-activation structure."""
    _setup_logging()
    from dataclasses import replace

    from model.data.synthetic import DEFAULT_SYNTHETIC, write_synthetic

    if items < categories:
        _fail(f"--items ({items}) must be at least --categories ({categories}): every category needs an item")
    config = replace(DEFAULT_SYNTHETIC, users=users, items=items, categories=categories, seed=seed)
    path = write_synthetic(config, out)
    typer.echo(str(path))


@app.command()
def train(
    data: DataOpt = "synthetic",
    model: Annotated[str, typer.Option(help="Model type, e.g. din or base.")] = "din",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (data split, init, order).")] = 0,
    out: Annotated[Path, typer.Option(help="Directory the bundle is written into.")] = DEFAULT_BUNDLES,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Train a model, evaluate it (validation per epoch, test once) and export the ONNX bundle."""
    _setup_logging()
    from dataclasses import replace

    from model.bundle import update_latest
    from model.registry import MODELS
    from model.train import TrainConfig
    from model.train import train as run_training

    if model not in MODELS:
        _fail(f"--model {model!r} is not known; choose one of: {', '.join(sorted(MODELS))}")
    _load_log(data)  # validates --data early with a clear message
    config = TrainConfig(data=data, model=model, seed=seed, out=out)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    result = run_training(config)
    update_latest(out, result.bundle)
    payload = {"bundle": str(result.bundle), "model": result.model, "metrics": result.metrics}
    if json_output:
        typer.echo(json.dumps(_finite(payload), allow_nan=False))
    else:
        m = result.metrics
        typer.echo(
            f"{result.model}: test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  logloss {m['logloss']:.4f}\n"
            f"bundle: {result.bundle}"
        )


@app.command()
def load(
    bundle: Annotated[Path, typer.Option(help="Model bundle (or a directory of bundles).")],
    data: DataOpt = "synthetic",
    redis_url: RedisUrlOpt = None,
    namespace: Annotated[str, typer.Option(help="Key namespace in Redis.")] = "din",
) -> None:
    """Load users' behaviour histories into Redis (a new data version, switched atomically)."""
    _setup_logging()
    from feature_store.embedded import resolve_redis
    from feature_store.redis_store import RedisHistoryStore

    b = _load_bundle(bundle)
    log = _load_log(data)
    with resolve_redis(redis_url, DIN_HOME / "redis") as url:
        store = RedisHistoryStore.from_url(url, namespace=namespace)
        report = store.bulk_load(log, max_history=b.spec.max_history, profile_fields=b.spec.profile_fields)
    typer.echo(
        f"loaded {report.users} users, {report.events} behaviours into data version "
        f"{report.version} in {report.seconds:.1f}s"
    )


@app.command()
def serve(
    bundle: Annotated[Path, typer.Option(help="Model bundle (or a directory of bundles).")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
    redis_url: RedisUrlOpt = None,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs CPU under load).")] = True,
) -> None:
    """Serve the ranking API (POST /rank) under uvicorn."""
    _setup_logging()
    from model.bundle import resolve_bundle_path

    from feature_store.embedded import resolve_redis

    bundle_path = resolve_bundle_path(bundle)
    _load_bundle(bundle_path)  # refuse a bad bundle before starting anything
    with resolve_redis(redis_url, DIN_HOME / "redis") as url:
        _run_server(bundle_path, url, host, port, access_log=access_log)


def _run_server(bundle: Path, redis_url: str, host: str, port: int, access_log: bool = True) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(bundle=bundle, redis_url=redis_url, host=host, port=port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=access_log)


@app.command()
def demo(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8000,
    retrain: Annotated[bool, typer.Option(help="Train a new model even if a demo bundle exists.")] = False,
) -> None:
    """Synthetic data -> DIN -> ONNX bundle -> embedded Redis -> ranking API on localhost."""
    _setup_logging()
    from model.bundle import BundleError, resolve_bundle_path, update_latest

    from feature_store.embedded import EmbeddedRedis
    from feature_store.redis_store import RedisHistoryStore

    bundles = DIN_HOME / "demo" / "bundles"
    try:
        if retrain:
            raise BundleError("retrain asked")
        bundle_path = resolve_bundle_path(bundles)
        typer.echo(f"[demo] reusing bundle {bundle_path} (pass --retrain for a new one)", err=True)
    except BundleError:
        from model.train import TrainConfig
        from model.train import train as run_training

        typer.echo("[demo] training DIN on the default synthetic data", err=True)
        result = run_training(TrainConfig(data="synthetic", model="din", out=bundles))
        update_latest(bundles, result.bundle)
        bundle_path = result.bundle
        m = result.metrics
        typer.echo(f"[demo] test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}", err=True)
    b = _load_bundle(bundle_path)
    log = _load_log("synthetic")
    with EmbeddedRedis(DIN_HOME / "demo" / "redis") as redis:
        typer.echo(f"[demo] embedded Redis at {redis.url}; loading histories", err=True)
        store = RedisHistoryStore.from_url(redis.url)
        store.bulk_load(log, max_history=b.spec.max_history, profile_fields=b.spec.profile_fields)
        user = int(log.user_id[0])
        typer.echo(
            f"\n[demo] ranking API on http://127.0.0.1:{port}  (docs: /docs)\n"
            f"[demo] try:\n  curl -s localhost:{port}/rank -H 'content-type: application/json' "
            f"-d '{{\"user_id\": {user}, \"candidates\": [{{\"item_id\": 7, \"cate_id\": 3}}, "
            f"{{\"item_id\": 42, \"cate_id\": 5}}], \"top_k\": 10}}'\n",
            err=True,
        )
        _run_server(bundle_path, redis.url, "127.0.0.1", port)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def loadtest(ctx: typer.Context) -> None:
    """Load-test the service with locust (headless); report, plot, thresholds. See --help."""
    from loadtest.run import main as run_loadtest

    raise typer.Exit(run_loadtest(["run", *ctx.args]))


# ---------------------------------------------------------------------------------------
# din bench ...: benchmarks as commands (not timed tests). Each keeps its logic in a module.
bench_app = typer.Typer(help="Benchmarks: scoring kernels, the whole service.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _parse_cases(text: str) -> tuple[tuple[int, int, int], ...]:
    try:
        cases = tuple(tuple(int(x) for x in c.lower().split("x")) for c in text.split(",") if c.strip())
    except ValueError:
        cases = ()
    if not cases or any(len(c) != 3 or min(c) < 1 for c in cases):
        _fail(f"--cases {text!r}: expected USERSxHISTORYxCANDIDATES[,...], e.g. 1x50x200,16x50x3200")
    return cases  # type: ignore[return-value]


@bench_app.command("scoring")
def bench_scoring(
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    cases: Annotated[str, typer.Option(help="USERSxHISTORYxCANDIDATES, comma-separated.")] = "1x50x200,1x100x500,16x50x3200",
    impls: Annotated[str, typer.Option(help="Comma-separated: torch_eager_naive,onnx_naive,onnx_optimized.")] = "torch_eager_naive,onnx_naive,onnx_optimized",
    threads: Annotated[Optional[int], typer.Option(min=1, help="Threads for every implementation (default: the cores).")] = None,
    seconds: Annotated[float, typer.Option(min=0.1, help="Timed seconds per implementation and case.")] = 2.0,
    device: Annotated[str, typer.Option(help="cpu | cuda | tensorrt (ONNX Runtime; torch follows on CUDA).")] = "cpu",
    spinning: Annotated[bool, typer.Option(help="ONNX Runtime intra-op thread spinning.")] = False,
) -> None:
    """Naive vs optimised DIN scoring side by side: candidates/s, latency, GFLOP/s, utilisation."""
    _setup_logging()
    from dataclasses import replace

    from service.bench_scoring import ScoringBenchConfig, format_table, run_scoring_bench

    if device not in ("cpu", "cuda", "tensorrt"):
        _fail(f"--device {device!r}: choose cpu, cuda or tensorrt")
    config = ScoringBenchConfig(
        cases=_parse_cases(cases), impls=tuple(i.strip() for i in impls.split(",") if i.strip()),
        seconds=seconds, device=device, allow_spinning=spinning,
    )  # fmt: skip
    if threads is not None:
        config = replace(config, threads=threads)
    try:
        result = run_scoring_bench(config, log=lambda m: typer.echo(f"[bench] {m}", err=True))
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result) if json_output else format_table(result))


@bench_app.command("service")
def bench_service(
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    users: Annotated[int, typer.Option(min=1, help="Synthetic users loaded into Redis.")] = 100_000,
    history: Annotated[int, typer.Option(min=1, help="Behaviours per user.")] = 50,
    candidates: Annotated[int, typer.Option(min=1, help="Candidates per request.")] = 200,
    levels: Annotated[str, typer.Option(help="Offered loads as multiples of the scoring requests/s.")] = "0.1,0.25,0.5,0.75,1.0,1.25,1.5",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per load level.")] = 6.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="The service's intra-op threads (default: the cores).")] = None,
    spinning: Annotated[bool, typer.Option(help="ONNX Runtime thread spinning in the service.")] = False,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Micro-batch max wait (BATCH_MAX_WAIT_MS).")] = 0.2,
    batch_candidates: Annotated[Optional[int], typer.Option(min=1, help="Micro-batch size (BATCH_MAX_CANDIDATES; default: the service's).")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Serve this bundle (default: export the benchmark DIN).")] = None,
    client: Annotated[str, typer.Option(help="raw (asyncio, little CPU) | httpx (async httpx).")] = "raw",
) -> None:
    """The real service (uvicorn, micro-batcher, Redis with 100k users) under increasing load."""
    _setup_logging()
    from dataclasses import replace

    from service.bench_service import ServiceBenchConfig, format_table, run_service_bench

    try:
        factors = tuple(float(x) for x in levels.split(",") if x.strip())
    except ValueError:
        factors = ()
    if not factors or min(factors) <= 0:
        _fail(f"--levels {levels!r}: expected positive numbers, e.g. 0.25,0.5,1.0")
    config = ServiceBenchConfig(
        users=users, history=history, candidates=candidates, levels=factors, seconds=seconds, spinning=spinning,
        batch_max_wait_ms=max_wait_ms, batch_max_candidates=batch_candidates, bundle=bundle, client=client,
    )  # fmt: skip
    if client not in ("raw", "httpx"):
        _fail(f"--client {client!r}: choose raw or httpx")
    if threads is not None:
        config = replace(config, threads=threads)
    try:
        result = run_service_bench(config, log=lambda m: typer.echo(f"[bench] {m}", err=True))
    except RuntimeError as e:
        _fail(str(e))
    typer.echo(json.dumps(result) if json_output else format_table(result))


if __name__ == "__main__":
    app()
