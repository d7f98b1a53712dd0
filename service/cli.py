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
    model: Annotated[str, typer.Option(help="lr | base | wdl | pnn | deepfm | din | din_dice.")] = "din",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (data split, init, order).")] = 0,
    out: Annotated[Path, typer.Option(help="Directory the bundle is written into.")] = DEFAULT_BUNDLES,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    reg: Annotated[str, typer.Option(help="Regulariser: none | l2 | mba (mini-batch aware) | dropout (id dropout).")] = "none",
    reg_lambda: Annotated[float, typer.Option(min=0.0, help="Lambda of --reg l2 / mba.")] = 0.0,
    id_dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="Drop probability of --reg dropout.")] = 0.5,
    attention_softmax: Annotated[bool, typer.Option("--attention-softmax", help="Normalise DIN's attention with a softmax (the paper has none).")] = False,
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
    try:
        config = TrainConfig(
            data=data, model=model, seed=seed, out=out, reg=reg, reg_lambda=reg_lambda, id_dropout=id_dropout,
            attention_softmax=attention_softmax,
        )
    except ValueError as e:
        _fail(str(e))
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
def experiment(
    data: DataOpt = "synthetic",
    models: Annotated[str, typer.Option(help="Comma-separated models to compare.")] = "lr,base,wdl,pnn,deepfm,din,din_dice",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per model (0..N-1): init and batch order.")] = 3,
    out: Annotated[Path, typer.Option(help="Directory for results.json, report.md and the figures.")] = Path("reports/experiment"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per run (the best on validation is kept).")] = 5,
    json_output: Annotated[bool, typer.Option("--json", help="Print results.json on stdout.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads per run (1 is fastest on a busy machine).")] = 1,
) -> None:
    """Compare models like the paper's Table 3: every model x seed, test once, report + figures."""
    _setup_logging()
    from model.experiment import ExperimentConfig, finite, run_experiment
    from model.report import comparison_table, data_table, din_vs_base

    _load_log(data)  # validates --data early with a clear message
    import shlex

    argv = sys.argv[1:]
    command = shlex.join(["din", *argv[argv.index("experiment") :]]) if "experiment" in argv else ""
    try:
        config = ExperimentConfig(
            data=data, models=tuple(m.strip() for m in models.split(",") if m.strip()), seeds=seeds, epochs=epochs,
            out=out, command=command, threads=threads,
        )
    except ValueError as e:
        _fail(str(e))
    result = run_experiment(config)
    if json_output:
        typer.echo(json.dumps(finite(result.results), allow_nan=False))
    else:
        r = result.results
        typer.echo(f"{data_table(r)}\n\n{comparison_table(r)}\n\n{din_vs_base(r)}\n\nwritten: {out / 'report.md'}")


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
) -> None:
    """Serve the ranking API (POST /rank) under uvicorn."""
    _setup_logging()
    from model.bundle import resolve_bundle_path

    from feature_store.embedded import resolve_redis

    bundle_path = resolve_bundle_path(bundle)
    _load_bundle(bundle_path)  # refuse a bad bundle before starting anything
    with resolve_redis(redis_url, DIN_HOME / "redis") as url:
        _run_server(bundle_path, url, host, port)


def _run_server(bundle: Path, redis_url: str, host: str, port: int) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(bundle=bundle, redis_url=redis_url, host=host, port=port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


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


if __name__ == "__main__":
    app()
