"""`din`: one console entry point for every job a user runs.

Imports are lazy inside each command: `din serve` must start in the serving image, which
has no torch, and `din --help` should answer instantly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
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

DEFAULT_BUNDLES = Path("artifacts/bundles")

RedisUrlOpt = Annotated[
    Optional[str],
    typer.Option("--redis-url", envvar="REDIS_URL", help="External Redis; default: the embedded one."),
]
RedisClusterOpt = Annotated[
    bool,
    typer.Option("--redis-cluster", envvar="REDIS_CLUSTER", help="Use the Redis Cluster client (or a redis+cluster:// URL)."),
]
def _valid_namespace(ctx: typer.Context, param: typer.CallbackParam, namespace: str) -> str:
    """Refused while the options are read, before any data, by the rule the service applies to REDIS_NAMESPACE."""
    from feature_store.keys import check_name

    # click reads an empty environment variable as unset: without this the command would use
    # "din" where `din serve` refuses the same environment
    if os.environ.get("REDIS_NAMESPACE") == "" and ctx.get_parameter_source(param.name).name == "DEFAULT":
        _fail("REDIS_NAMESPACE is set but empty: name a namespace, or unset it for the default 'din'")
    try:
        check_name(namespace, "namespace")
    except ValueError as e:
        _fail(f"--namespace / REDIS_NAMESPACE: {e}")
    return namespace


NamespaceOpt = Annotated[
    str,
    typer.Option(
        "--namespace", envvar="REDIS_NAMESPACE", callback=_valid_namespace,
        help="Key namespace in Redis (the service's REDIS_NAMESPACE).",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="synthetic | events:PATH | movielens:PATH | amazon:PATH"),
]


@app.callback()
def _main() -> None:
    # runs before a command's options are parsed (their envvars read): `.env` counts as the environment
    _load_dotenv()


def _load_dotenv() -> None:
    """`./.env` into the environment, as the service's settings read it; what is already set wins."""
    from dotenv import load_dotenv

    env_file = Path(".env")
    if env_file.is_file():
        load_dotenv(env_file, override=False, encoding="utf-8")


def _din_home() -> Path:
    """Read when used, not at import: after `.env` is loaded."""
    return Path(os.environ.get("DIN_HOME", ".din"))


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)




def _writable_dir(path: Path, option: str) -> None:
    """Make the directory a command writes into, and write to it, before the work: a path under
    a file, on a read-only mount or in a pseudo file system is refused now, not after the
    training with a traceback. The directories made for the probe are removed again (the
    command makes them when it writes), so a command refused later leaves nothing behind."""
    made = []
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                _fail(f"{option} {str(path)!r}: {str(p)!r} is a file, not a directory; pass a directory")
            break
        made.append(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        _fail(f"{option} {str(path)!r} cannot be written ({e.strerror or e}); pass a writable directory")
    finally:
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()


def _refuse_bundle_as_out(out: Path) -> None:
    """--out holds bundles and their `latest` link; a new bundle written inside an old one is never served."""
    from model.bundle import LATEST, MANIFEST

    if (out / MANIFEST).is_file():
        _fail(f"--out {str(out)!r} is a bundle (it holds {MANIFEST}); pass the directory that holds the bundles, "
              f"e.g. {str(out.resolve().parent)!r}")  # fmt: skip
    if (out / LATEST).exists() and not (out / LATEST).is_symlink():
        _fail(f"--out {str(out)!r}: {str(out / LATEST)!r} is not the link din train keeps to the newest bundle; move it away")


def _metric(value) -> str:
    """A test metric for the one-line summary: 'n/a' where it is undefined (NaN, or null from JSON)."""
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _refuse_unbindable(host: str, port: int, port_option: str, host_option: str | None = None) -> None:
    """Bind host:port as uvicorn will (every address it resolves to, SO_REUSEADDR), then let go:
    a busy port is one line before anything is loaded, not an error after "startup complete"."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        _fail(f"cannot bind {host}:{port}: {e.strerror}; check {host_option or 'the host'}")
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    _fail(f"port {port} on {host} is already in use; stop what holds it or pick another with {port_option}")
                _fail(f"cannot bind {host}:{port}: {e.strerror}; check {' and '.join(filter(None, (host_option, port_option)))}")
    finally:
        for sock in sockets:
            sock.close()


def _load_bundle(path: Path):
    from model.bundle import BundleError, load_bundle, resolve_bundle_path

    try:
        return load_bundle(resolve_bundle_path(path))
    except BundleError as e:
        _fail(str(e))


def _refuse_unloadable_model(bundle) -> None:
    """A corrupt graph is one line here, not a traceback from the server's start-up."""
    from model.bundle import BundleError
    from service.scorer import check_onnx_loads

    try:
        check_onnx_loads(bundle)
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
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed.")] = 0,
) -> None:
    """Generate a synthetic behaviour log (Parquet) with planted local-activation structure."""
    _setup_logging()
    from dataclasses import replace

    from model.data.synthetic import DEFAULT_SYNTHETIC, write_synthetic

    if out.suffix.lower() != ".parquet":
        _fail(f"--out {str(out)!r} must end in .parquet: din synth writes Parquet (read back as --data events:PATH)")
    if items < categories:
        _fail(f"--items ({items}) must be at least --categories ({categories}): every category needs an item")
    interests = tuple(min(k, categories) for k in DEFAULT_SYNTHETIC.interests_per_user)  # a user cannot like more than exist
    config = replace(DEFAULT_SYNTHETIC, users=users, items=items, categories=categories, seed=seed, interests_per_user=interests)
    try:
        path = write_synthetic(config, out)
    except OSError as e:
        _fail(f"cannot write --out {str(out)!r}: {e}")
    typer.echo(str(path))


@app.command()
def train(
    data: DataOpt = "synthetic",
    model: Annotated[str, typer.Option(help="lr | base | wdl | pnn | deepfm | din | din_dice.")] = "din",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs (default: 3; the best on validation is exported).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed (data split, init, order).")] = 0,
    out: Annotated[Path, typer.Option(help="Directory the bundle is written into.")] = DEFAULT_BUNDLES,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Data-parallel processes (torchrun, DDP); implies --stream.")] = 1,
    stream: Annotated[bool, typer.Option(help="Stream a sorted Parquet log in blocks instead of loading it.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the newest checkpoint in --run-dir (streamed).")] = False,
    hash_buckets: Annotated[Optional[int], typer.Option(min=1, help="Hash ids into N rows per field (streamed).")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps; 0: epoch ends (streamed).")] = 0,
    run_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints and report of a streamed run (default: OUT/../runs/MODEL, shared by sibling --out directories).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader workers per process (streamed).")] = 0,
    reg: Annotated[str, typer.Option(help="Regulariser: none | l2 | mba (mini-batch aware) | dropout (id dropout).")] = "none",
    reg_lambda: Annotated[float, typer.Option(min=0.0, help="Lambda of --reg l2 / mba.")] = 0.0,
    id_dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Drop probability of --reg dropout (default: 0.5).")] = None,
    attention_softmax: Annotated[bool, typer.Option("--attention-softmax", help="Normalise DIN's attention with a softmax (the paper has none).")] = False,
) -> None:
    """Train a model, evaluate it (validation per epoch, test once) and export the ONNX bundle."""
    _setup_logging()
    from dataclasses import replace

    from model.bundle import finite, update_latest
    from model.data.log import UntrainableLogError
    from model.registry import MODELS
    from model.train import TrainConfig
    from model.train import train as run_training

    if model not in MODELS:
        _fail(f"--model {model!r} is not known; choose one of: {', '.join(sorted(MODELS))}")
    _refuse_bundle_as_out(out)
    _writable_dir(out, "--out")
    if run_dir is not None:
        _writable_dir(run_dir, "--run-dir")
    if id_dropout is not None and reg != "dropout":
        _fail(f"--id-dropout {id_dropout:g} would be ignored: it is the drop probability of --reg dropout, not --reg {reg}")
    if id_dropout == 0:
        _fail("--id-dropout 0 drops nothing: that run is --reg none")
    dropout = {} if id_dropout is None else {"id_dropout": id_dropout}
    if stream or nproc > 1 or resume or hash_buckets or checkpoint_every or run_dir or workers:
        from model.data.stream import DEFAULT_SHARDS
        from model.train_dist import DistTrainConfig

        try:  # every option of this command reaches the streamed trainer; a bad value is an error here
            config = DistTrainConfig(
                data=data, model=model, seed=seed, out=out, resume=resume, hash_buckets=hash_buckets,
                checkpoint_every=checkpoint_every, run_dir=run_dir, workers=workers, reg=reg, reg_lambda=reg_lambda,
                attention_softmax=attention_softmax, **dropout, **({"epochs": epochs} if epochs else {}),
                **({"shards": nproc} if nproc > DEFAULT_SHARDS else {}),  # every process needs a data shard
            )  # fmt: skip
        except ValueError as e:
            _fail(str(e))
        _train_streamed(config, nproc, json_output)
        return
    _load_log(data)  # validates --data early with a clear message
    try:
        config = TrainConfig(
            data=data, model=model, seed=seed, out=out, reg=reg, reg_lambda=reg_lambda, attention_softmax=attention_softmax,
            **dropout,
        )
    except ValueError as e:
        _fail(str(e))
    if epochs is not None:
        config = replace(config, epochs=epochs)
    try:
        result = run_training(config)
    except UntrainableLogError as e:
        _fail(str(e))
    update_latest(out, result.bundle)
    payload = {"bundle": str(result.bundle), "model": result.model, "metrics": result.metrics}
    if json_output:
        typer.echo(json.dumps(finite(payload), allow_nan=False))
    else:
        m = result.metrics
        typer.echo(
            f"{result.model}: test AUC {_metric(m['auc'])}  GAUC {_metric(m['gauc'])}  logloss {_metric(m['logloss'])}\n"
            f"bundle: {result.bundle}"
        )


def _train_streamed(config, nproc: int, json_output: bool) -> None:
    """`din train --stream / --nproc N`: model/train_dist.py, in this process or under torchrun."""
    from model.bundle import finite, update_latest
    from model.data.log import LogFormatError
    from model.train_dist import launch

    try:
        report = launch(config, nproc)
    except (LogFormatError, ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    update_latest(config.out, Path(report["bundle"]))
    payload = {"bundle": report["bundle"], "model": report["model"], "metrics": report["metrics"], "world": report["world"],
               "samples_per_second": report["samples_per_second"], "report": str(config.run_path / "report.json")}  # fmt: skip
    if json_output:
        typer.echo(json.dumps(finite(payload), allow_nan=False))
    else:
        m = report["metrics"]
        typer.echo(
            f"{report['model']} ({report['world']} process(es), {report['samples_per_second']:.0f} samples/s): "
            f"test AUC {_metric(m['auc'])}  GAUC {_metric(m['gauc'])}  logloss {_metric(m['logloss'])}\nbundle: {report['bundle']}"
        )


@app.command()
def prepare(
    source: Annotated[Path, typer.Argument(help="Behaviour log (Parquet or CSV).")],
    out: Annotated[Path, typer.Argument(help="Sorted Parquet log to write.")],
    memory_mb: Annotated[int, typer.Option(min=16, help="Memory budget of the external sort.")] = 512,
    row_group_rows: Annotated[int, typer.Option(min=1, help="Rows per Parquet row group of OUT.")] = 65_536,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Sort a behaviour log by (user_id, timestamp) in bounded memory, for streamed training."""
    _setup_logging()
    from model.data.log import LogFormatError
    from model.data.prepare import prepare_log

    if out.suffix.lower() != ".parquet":
        _fail(f"OUT {str(out)!r} must end in .parquet: din prepare writes Parquet (read back as --data events:PATH)")
    if out.is_dir():
        _fail(f"OUT {str(out)!r} is a directory; name the Parquet file to write")
    _writable_dir(out.parent, "OUT's directory")
    try:
        report = prepare_log(source, out, memory_mb=memory_mb, row_group_rows=row_group_rows, progress=not json_output)
    except (LogFormatError, ValueError) as e:
        _fail(str(e))
    if json_output:
        typer.echo(json.dumps(report.to_json()))
    else:
        typer.echo(f"{report.out}: {report.rows} events of {report.users} users sorted in {report.seconds:.1f}s ({report.partitions} partition(s))")


# din bench ...: benchmarks as commands (not timed tests), one run each. Each keeps its logic in a module.
bench_app = typer.Typer(help="Benchmarks (scoring kernels, the whole service, the store, training): one run each; JSON with --json.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train(
    users: Annotated[int, typer.Option(min=1, help="Synthetic users (about 30 events each).")] = 20_000,
    procs: Annotated[str, typer.Option(help="Process counts to time, comma-separated.")] = "1,2",
    steps: Annotated[int, typer.Option(min=1, help="Timed global steps per run.")] = 60,
    batch_size: Annotated[int, typer.Option(min=8, help="Global batch size.")] = 1024,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads per process.")] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "cpu",
    work_dir: Annotated[Optional[Path], typer.Option(help="Cache for the log and runs.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Training throughput (samples/s) and peak RSS of DIN with 1 and 2 processes."""
    _setup_logging()
    from model.bench_train import TrainBenchConfig
    from model.bench_train import bench_train as run_bench

    try:
        counts = tuple(int(p) for p in procs.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        _fail(f"--procs {procs!r} must be comma-separated process counts of at least 1, e.g. 1,2")
    result = run_bench(TrainBenchConfig(work_dir=work_dir or _din_home() / "bench" / "train", users=users, procs=counts,
                                        steps=steps, batch_size=batch_size, device=device, threads=threads))  # fmt: skip
    if json_output:
        typer.echo(json.dumps(result))
    else:
        for r in result["runs"]:
            typer.echo(f"{r['nproc']} process(es): {r['samples_per_second']:.0f} samples/s (x{r['speedup']}), peak RSS {r['peak_rss_mb']:.0f} MB")


@bench_app.command("train-memory")
def bench_train_memory(
    events: Annotated[int, typer.Option(min=1, help="Events in the generated log.")] = 20_000_000,
    steps: Annotated[int, typer.Option(min=1, help="Training steps on it.")] = 200,
    eval_blocks: Annotated[int, typer.Option(min=1, help="Blocks evaluated per split.")] = 8,
    work_dir: Annotated[Optional[Path], typer.Option(help="Where the log is generated (deleted after).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Train on a generated log of EVENTS events and print the trainer's peak RSS (limit 2 GiB)."""
    _setup_logging()
    from model.bench_train import MemoryBenchConfig
    from model.bench_train import bench_train_memory as run_bench

    result = run_bench(MemoryBenchConfig(work_dir=work_dir or _din_home() / "bench" / "train-memory", events=events,
                                         steps=steps, eval_blocks=eval_blocks), progress=not json_output)  # fmt: skip
    if json_output:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{result['events']} events, {result['train_steps']} steps: peak RSS {result['peak_rss_mb']:.0f} MB "
                   f"(limit {result['limit_mb']:.0f} MB: {'ok' if result['under_limit'] else 'EXCEEDED'})")  # fmt: skip


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
    from model.data.log import UntrainableLogError
    from model.bundle import finite
    from model.experiment import ExperimentConfig, run_experiment
    from model.report import comparison_table, data_table, din_vs_base

    _writable_dir(out, "--out")
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
    try:
        result = run_experiment(config)
    except UntrainableLogError as e:
        _fail(str(e))
    if json_output:
        typer.echo(json.dumps(finite(result.results), allow_nan=False))
    else:
        r = result.results
        typer.echo(f"{data_table(r)}\n\n{comparison_table(r)}\n\n{din_vs_base(r)}\n\nwritten: {out / 'report.md'}")


@app.command()
def load(
    data: DataOpt = "synthetic",
    bundle: Annotated[
        Optional[Path], typer.Option(help="Model bundle (or a directory of bundles): its max history and profile fields.")
    ] = None,
    redis_url: RedisUrlOpt = None,
    redis_cluster: RedisClusterOpt = False,
    namespace: NamespaceOpt = "din",
    max_history: Annotated[
        Optional[int], typer.Option(min=1, help="Behaviours kept per user (default: the bundle's, else 50).")
    ] = None,
    user_ttl: Annotated[
        int, typer.Option(min=0, help="Seconds a user without new behaviours is kept (0: forever).")
    ] = 0,
    keep_old: Annotated[bool, typer.Option(help="Keep the previous data version after the switch.")] = False,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds the previous version stays after the switch, for readers.")
    ] = 2.0,
    resume: Annotated[bool, typer.Option(help="Continue a killed load of the same data where it stopped.")] = True,
    chunk_users: Annotated[int, typer.Option(min=1, help="Users per Redis round trip.")] = 1000,
    json_output: Annotated[bool, typer.Option("--json", help="Print the load report as JSON on stdout.")] = False,
) -> None:
    """Load users' histories and ad features into Redis (a new data version, switched atomically)."""
    _setup_logging()
    from feature_store.redis_store import RedisHistoryStore

    profile_fields = None
    history = max_history or 50
    if bundle is not None:
        b = _load_bundle(bundle)
        profile_fields = b.spec.profile_fields
        history = max_history or b.spec.max_history
    log = _load_log(data)
    with _redis(redis_url, _din_home() / "redis") as url, _store_errors():
        store = RedisHistoryStore.from_url(url, namespace=namespace, cluster=redis_cluster or None)
        report = store.bulk_load(
            log, max_history=history, profile_fields=profile_fields, keep_old=keep_old, grace_s=grace,
            user_ttl_s=user_ttl, resume=resume, chunk_users=chunk_users, progress=not json_output,
        )
    if json_output:
        typer.echo(json.dumps(report.to_json()))
        return
    resumed = f" (resumed at user {report.resumed_from})" if report.resumed_from else ""
    typer.echo(
        f"loaded {report.users} users, {report.events} behaviours, {report.ads} ads into data version "
        f"{report.version} in {report.seconds:.1f}s ({report.users_per_s:,.0f} users/s){resumed}"
    )


@contextlib.contextmanager
def _redis(url: str | None, data_dir: Path, in_use: str | None = None) -> Iterator[str]:
    """`url`, else a built-in Redis on `data_dir`; one that cannot start (e.g. another command's
    already runs there) is one error line saying which URL to use instead (or `in_use`)."""
    from feature_store.embedded import DataDirInUse, EmbeddedRedisError, resolve_redis

    with contextlib.ExitStack() as stack:
        try:
            resolved = stack.enter_context(resolve_redis(url, data_dir))
        except DataDirInUse as e:
            _fail(in_use or str(e))
        except EmbeddedRedisError as e:
            _fail(str(e))
        yield resolved


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """A store the command cannot use (unreachable, a URL or namespace it refuses, not a
    cluster) is one line naming the problem, exit 2: the messages already say what to fix."""
    import redis

    from feature_store.base import StoreError, StoreUnavailableError

    try:
        yield
    except (StoreUnavailableError, StoreError, ValueError, redis.RedisError, redis.exceptions.RedisClusterException) as e:
        _fail(str(e))


def _settings_or_fail(**overrides):
    """Settings from the environment (and .env) plus `overrides`; a bad value is one line, exit 2."""
    from pydantic import ValidationError

    from service.settings import Settings, settings_error_message

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        _fail(settings_error_message(e))


@app.command()
def events(
    path: Annotated[Path, typer.Argument(help="CSV or Parquet: user_id, item_id, cate_id, timestamp, event_id.")],
    redis_url: RedisUrlOpt = None,
    redis_cluster: RedisClusterOpt = False,
    namespace: NamespaceOpt = "din",
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Events per Redis round trip.")] = 1000,
    json_output: Annotated[bool, typer.Option("--json", help="Print the totals as JSON on stdout.")] = False,
) -> None:
    """Append live behaviour events from a file (idempotent per event_id: a re-sent file adds nothing)."""
    _setup_logging()
    import asyncio

    from tqdm import tqdm

    from feature_store.events import read_events
    from feature_store.redis_store import RedisHistoryStore
    from model.data.log import LogFormatError

    try:
        batch_events = read_events(path)
    except LogFormatError as e:
        _fail(str(e))

    async def append_all(url: str) -> dict:
        store = RedisHistoryStore.from_url(url, namespace=namespace, cluster=redis_cluster or None, socket_timeout=10.0)
        totals = {"events": 0, "applied": 0, "duplicates": 0, "data_version": None}
        try:
            with tqdm(total=len(batch_events), unit="events", unit_scale=True, file=sys.stderr,
                      disable=json_output, desc="events") as bar:
                for a in range(0, len(batch_events), batch):
                    report = await store.append_events(batch_events.slice(a, a + batch))
                    for k in ("events", "applied", "duplicates"):
                        totals[k] += getattr(report, k)
                    totals["data_version"] = report.version
                    bar.update(report.events)
        finally:
            await store.close()
        return totals

    with _redis(redis_url, _din_home() / "redis") as url, _store_errors():
        totals = asyncio.run(append_all(url))
    if json_output:
        typer.echo(json.dumps(totals))
    else:
        typer.echo(
            f"appended {totals['applied']} of {totals['events']} events ({totals['duplicates']} duplicates) "
            f"into data version {totals['data_version']}"
        )


store_app = typer.Typer(help="Inspect the feature store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("stats")
def store_stats(
    redis_url: RedisUrlOpt = None,
    redis_cluster: RedisClusterOpt = False,
    namespace: NamespaceOpt = "din",
    json_output: Annotated[bool, typer.Option("--json", help="Print the stats as JSON on stdout.")] = False,
) -> None:
    """Users, keys, bytes per user, memory used and data version of the live data."""
    _setup_logging()
    import asyncio

    from feature_store.redis_store import RedisHistoryStore

    async def collect(url: str):
        store = RedisHistoryStore.from_url(url, namespace=namespace, cluster=redis_cluster or None, socket_timeout=30.0)
        try:
            return await store.stats()
        finally:
            await store.close()

    with _redis(redis_url, _din_home() / "redis") as url, _store_errors():
        stats = asyncio.run(collect(url))
    if json_output:
        typer.echo(json.dumps(stats.to_json()))
        return
    rows = [
        ("namespace", stats.namespace), ("data version", stats.version or "(nothing loaded)"),
        ("users", f"{stats.users:,}"), ("ads", f"{stats.ads:,}"), ("keys (all)", f"{stats.keys:,}"),
        ("bytes per user", f"{stats.bytes_per_user:,.0f} (value {stats.value_bytes_per_user:,.0f})"),
        ("memory used", f"{stats.memory_used / 2**20:,.1f} MiB"),
        ("versions present", ", ".join(stats.versions) or "-"), ("unfinished loads", ", ".join(stats.loading) or "-"),
        ("to be deleted", ", ".join(stats.retiring) or "-"),  # replaced by a load stopped in its grace period
    ]
    for name, value in rows:
        typer.echo(f"{name:<18}{value}")


@app.command()
def serve(
    bundle: Annotated[
        Optional[Path], typer.Option(help="Model bundle (or a directory of bundles); default: $BUNDLE.")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to bind; default: $HOST or 127.0.0.1.")] = None,
    port: Annotated[
        Optional[int], typer.Option(min=1, max=65535, help="Port to bind; default: $PORT or 8000.")
    ] = None,
    redis_url: RedisUrlOpt = None,
    redis_cluster: Annotated[
        Optional[bool], typer.Option("--redis-cluster", help="Use the Redis Cluster client; default: $REDIS_CLUSTER or off.")
    ] = None,
    access_log: Annotated[
        Optional[bool], typer.Option("--access-log/--no-access-log", help="Log every request (costs CPU under load); default: $ACCESS_LOG or on.")
    ] = None,
) -> None:
    """Serve the ranking API (POST /rank) under uvicorn. Every setting is an environment variable (README)."""
    settings = _settings_or_fail(
        bundle=bundle, host=host, port=port, redis_url=redis_url, redis_cluster=redis_cluster, access_log=access_log
    )
    _refuse_unbindable(settings.host, settings.port, "--port / PORT", "--host / HOST")  # before loading anything
    from model.bundle import BundleError
    from service.hot_reload import resolve_bundle

    try:
        bundle_path = resolve_bundle(settings.bundle)
    except BundleError as e:
        _fail(str(e))
    _refuse_unloadable_model(_load_bundle(bundle_path))  # refuse a bad bundle before starting anything
    with _redis(settings.redis_url, _din_home() / "redis") as url:
        _run_server(settings.model_copy(update={"redis_url": url}))


def _run_server(settings) -> None:
    """uvicorn with our JSON logs (its access log off: ours has the request id) and a drain on SIGTERM."""
    import uvicorn

    from service.app import create_app
    from service.structured_logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        timeout_keep_alive=settings.keep_alive_s,
        # uvicorn refuses a request (503) once open connections reach its limit, counting the one asking:
        # +1, so that MAX_CONNECTIONS connections are all served.
        limit_concurrency=None if settings.max_connections is None else settings.max_connections + 1,
    )


@app.command()
def reload(
    url: Annotated[str, typer.Option(envvar="DIN_URL", help="Base URL of the running service.")] = "http://127.0.0.1:8000",
    bundle: Annotated[
        Optional[str],
        typer.Option(help="Bundle path on the server (or a directory of bundles); default: its BUNDLE, re-read."),
    ] = None,
    token: Annotated[
        Optional[str], typer.Option(envvar="ADMIN_TOKEN", help="Admin bearer token (default: $ADMIN_TOKEN).")
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for load + warm-up.")] = 120.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON on stdout.")] = False,
) -> None:
    """Hot-reload the model of a running service (POST /admin/reload); the old one serves until the swap."""
    import httpx

    from service.settings import header_secret_problem

    token = (token or "").strip(" \t")  # as the service strips the header's value
    if not token:
        _fail("no admin token: pass --token or set ADMIN_TOKEN")
    if problem := header_secret_problem(token):  # non-ASCII: httpx raises; a control character: no valid header
        _fail(f"--token / ADMIN_TOKEN: the admin token {problem}")
    try:
        r = httpx.post(
            f"{url.rstrip('/')}/admin/reload",
            json={"bundle": bundle} if bundle else None,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:  # InvalidURL is no HTTPError
        _fail(f"--url {url!r} is not a usable http:// or https:// URL: {e}")
    except httpx.HTTPError as e:
        _fail(f"cannot reach {url}: {type(e).__name__}: {e}")
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text[:500]}
    if json_output:
        typer.echo(json.dumps(body))
    if r.status_code != 200:
        detail = body.get("detail") if isinstance(body, dict) else body
        serving = body.get("model_version") if isinstance(body, dict) else None
        _fail(f"reload refused ({r.status_code}): {detail}" + (f"; still serving {serving}" if serving else ""), code=1)
    if not json_output:
        if body["changed"]:
            typer.echo(f"reloaded: {body['previous_version']} -> {body['model_version']} ({body['load_seconds']:.2f} s)")
        else:
            typer.echo(f"unchanged: {body['model_version']} is already serving")


@app.command()
def demo(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8000,
    retrain: Annotated[bool, typer.Option(help="Train a new model even if a demo bundle exists.")] = False,
) -> None:
    """Synthetic data -> DIN -> ONNX bundle -> embedded Redis -> ranking API on localhost."""
    _setup_logging()
    from model.bundle import BundleError, resolve_bundle_path, update_latest

    settings = _settings_or_fail(bundle=_din_home() / "demo" / "bundles", host="127.0.0.1", port=port)
    _refuse_unbindable(settings.host, port, "--port")  # before training or loading anything
    from feature_store.redis_store import RedisHistoryStore

    bundles = _din_home() / "demo" / "bundles"
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
    demo_redis = _din_home() / "demo" / "redis"
    external = settings.redis_url  # REDIS_URL: an external Redis or Redis Cluster; else the demo's own
    with _redis(external, demo_redis, in_use=f"another `din demo` runs on {demo_redis}; stop it first (Ctrl-C)") as redis_url:
        from feature_store.redis_store import redacted_url

        where = f"Redis at {redacted_url(redis_url)} (REDIS_URL)" if external else f"embedded Redis at {redis_url}"
        typer.echo(f"[demo] {where}; loading histories into namespace {settings.redis_namespace!r}", err=True)
        with _store_errors():
            store = RedisHistoryStore.from_url(redis_url, namespace=settings.redis_namespace, cluster=settings.redis_cluster or None)
            store.bulk_load(log, max_history=b.spec.max_history, profile_fields=b.spec.profile_fields)  # where the service reads
        user = int(log.user_id[0])
        typer.echo(
            f"\n[demo] explain page: http://127.0.0.1:{port}/\n"
            f"[demo] ranking API on http://127.0.0.1:{port}  (docs: /docs)\n"
            f"[demo] try:\n  curl -s localhost:{port}/rank -H 'content-type: application/json' "
            f"-d '{{\"user_id\": {user}, \"candidates\": [{{\"item_id\": 7, \"cate_id\": 3}}, "
            f"{{\"item_id\": 42, \"cate_id\": 5}}], \"top_k\": 10}}'\n",
            err=True,
        )
        _run_server(settings.model_copy(update={"redis_url": redis_url}))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def loadtest(ctx: typer.Context) -> None:
    """Load-test the service with locust (headless); report, plot, thresholds. See --help.

    `din loadtest population --data SPEC --out FILE` writes the traffic's population file only."""
    from loadtest.run import main as run_loadtest

    args = list(ctx.args) if ctx.args[:1] in (["population"], ["run"]) else ["run", *ctx.args]  # run: the default
    raise typer.Exit(run_loadtest(args))




@bench_app.command("store")
def bench_store(
    users: Annotated[int, typer.Option(min=1, help="Users to bulk load.")] = 1_000_000,
    history: Annotated[int, typer.Option(min=1, help="Behaviours per user.")] = 50,
    items: Annotated[int, typer.Option(min=1, help="Distinct ads in the synthetic log.")] = 100_000,
    redis_server: Annotated[
        Optional[Path], typer.Option(help="redis-server binary to start (default: the one on PATH, else the embedded one).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Feature store throughput (load, reads, appends, memory) and its ratio to redis-benchmark."""
    _setup_logging()
    from feature_store.bench import StoreBenchConfig, run_store_bench

    config = StoreBenchConfig(users=users, history=history, items=items, redis_server=redis_server)
    result, details = run_store_bench(config, progress=not json_output, log=lambda m: typer.echo(m, err=True))
    if json_output:
        typer.echo(json.dumps(result))
        typer.echo(json.dumps({"details": details}), err=True)
        return
    typer.echo(json.dumps(result, indent=2))
    typer.echo(json.dumps(details, indent=2))


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
    chunk_candidates: Annotated[Optional[int], typer.Option(min=0, help="onnx_optimized scores a batch in calls of whole users with at most this many candidates (default: the service's, 256 on the CPU; 0: one call).")] = None,
) -> None:
    """Naive vs optimised DIN scoring side by side: candidates/s, latency, GFLOP/s, utilisation."""
    _setup_logging()
    from dataclasses import replace

    from service.bench_scoring import ScoringBenchConfig, format_table, run_scoring_bench

    if device not in ("cpu", "cuda", "tensorrt"):
        _fail(f"--device {device!r}: choose cpu, cuda or tensorrt")
    config = ScoringBenchConfig(
        cases=_parse_cases(cases), impls=tuple(i.strip() for i in impls.split(",") if i.strip()),
        seconds=seconds, device=device, allow_spinning=spinning, chunk_candidates=chunk_candidates,
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
    levels: Annotated[str, typer.Option(help="Offered loads as multiples of the scoring requests/s.")] = "0.1,0.25,0.5,0.75,0.85,0.95,1.0,1.25,1.5",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per load level.")] = 6.0,
    half_seconds: Annotated[float, typer.Option(min=0.5, help="Seconds at half saturation (the p99 target's level).")] = 30.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="The service's intra-op threads (default: the cores but one, as the service).")] = None,
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
        users=users, history=history, candidates=candidates, levels=factors, seconds=seconds, half_seconds=half_seconds,
        spinning=spinning,
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
