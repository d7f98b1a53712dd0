"""Loading a model for serving, and swapping a new one in while requests keep flowing.

`load_scorer` is the one way a bundle becomes a Scorer the service uses, at start-up and on
reload: read and validate the bundle, check the API and the store carry every field it
reads, open the ONNX Runtime session, warm it up, all in a worker thread (the event loop
keeps serving meanwhile).

`ModelReloader.reload` swaps the new scorer in with one attribute store on `app.state`:
the micro-batcher (service/batcher.py) picks the scorer up once per batch and keeps that
object to the end of the batch, so a batch being scored finishes on the old model and its
answers report that version; the next batch gets the new model. The old session is freed
when its last batch drops it. A bundle that is missing,
corrupt or incompatible is refused with `ReloadRefused` and the old model keeps serving.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from feature_store.records import RECORD_FIELDS
from model.bundle import MANIFEST, ONNX_FILE, Bundle, BundleError, file_sha256, load_bundle, resolve_bundle_path
from service.metrics import ServiceMetrics
from service.schemas import Candidate
from service.scorer import Scorer, check_onnx_loads
from service.store_guard import StoreCallFailed
from service.settings import Settings

log = logging.getLogger(__name__)


def check_servable(bundle: Bundle) -> None:
    """The API and the store must carry every field the model reads; say which one is missing."""
    for f in bundle.spec.sequence_fields:
        if f not in Candidate.model_fields:
            raise BundleError(
                f"bundle {bundle.path} scores candidates by {f!r}, which POST /rank does not carry "
                f"(candidates have {sorted(Candidate.model_fields)})"
            )
        if f not in RECORD_FIELDS:
            raise BundleError(
                f"bundle {bundle.path} reads behaviour field {f!r}, which the history store does not keep "
                f"(records have {list(RECORD_FIELDS)})"
            )


def resolve_bundle(path: Path) -> Path:
    """A bundle directory as given, or the newest bundle of a directory of bundles."""
    path = Path(path)
    if not path.is_dir() or (path / "bundle.json").exists():
        return path  # load_bundle says what is wrong with it
    return resolve_bundle_path(path)


def _real_bundle_dir(path: Path) -> Path:
    """The directory a bundle path names now: a `latest` symlink resolved, a plain path as given.

    A bundle is loaded from its real directory, so that the serving scorer remembers which bundle
    it is (`latest` re-pointed later names another one) and every file is read from that one
    bundle, even if `latest` is re-pointed while it loads.
    """
    path = Path(path)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop: load_bundle says what is wrong
        return path
    return path if real == path.absolute() else real


def _model_version_at(path: Path) -> str | None:
    """The model_version that the bundle at `path` names in its manifest; None when it names none
    readable (loading it then says what is wrong)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("model_version") if isinstance(manifest, dict) else None
    return None if version is None else str(version)


def _load_and_warm(path: Path, settings: Settings, refuse_device_problem: bool) -> Scorer:
    bundle = load_bundle(_real_bundle_dir(path))
    check_servable(bundle)
    check_onnx_loads(bundle)
    scorer = Scorer.load(bundle, options=settings.runtime_options())
    if refuse_device_problem and scorer.device_problem:
        raise BundleError(scorer.device_problem)
    scorer.warm_up()
    return scorer


async def load_scorer(path: Path, settings: Settings, *, refuse_device_problem: bool = False) -> tuple[Scorer, float]:
    """(a loaded and warmed Scorer, seconds it took); BundleError when it cannot serve."""
    start = time.perf_counter()
    scorer = await anyio.to_thread.run_sync(partial(_load_and_warm, path, settings, refuse_device_problem))
    return scorer, time.perf_counter() - start


class ReloadRefused(Exception):
    """The new model was not swapped in; `status_code` is the HTTP answer, the old model serves on."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class ReloadResult:
    model_version: str
    previous_version: str | None
    changed: bool
    load_seconds: float


class ModelReloader:
    """Serialises reloads of one app's model (a second one while one runs is refused, 409)."""

    def __init__(self, state, settings: Settings, metrics: ServiceMetrics):
        self._state = state  # app.state: holds .scorer
        self._settings = settings
        self._metrics = metrics
        self._lock = anyio.Lock()

    async def reload(self, bundle: str | None = None) -> ReloadResult:
        if self._lock.locked():
            self._metrics.model_reloads.labels("refused").inc()
            raise ReloadRefused(409, "another reload is in progress; try again when it has finished")
        async with self._lock:
            try:
                result = await self._reload(bundle)
            except ReloadRefused as e:
                self._metrics.model_reloads.labels("refused").inc()
                current = getattr(self._state.scorer, "model_version", None)
                log.warning("reload refused (%s); still serving %s", e.message, current)
                raise
            self._metrics.model_reloads.labels("ok" if result.changed else "unchanged").inc()
            return result

    async def _reload(self, bundle: str | None) -> ReloadResult:
        old: Scorer | None = self._state.scorer
        source = Path(bundle) if bundle is not None else self._settings.bundle
        try:
            if not source.exists():
                raise ReloadRefused(404, f"bundle {source} does not exist")
            path = _real_bundle_dir(resolve_bundle(source))
            # Unchanged is decided by what the bundle is, not where it is: a path (BUNDLE=/models/x,
            # --bundle fixed, a `latest`) that now holds another model reloads it.
            if old is not None and _model_version_at(path) == old.model_version:
                # the same name; unchanged only with the graph that was loaded (a reload that landed
                # mid-copy loaded the old model.onnx under the new name: the finished copy reloads)
                if await anyio.to_thread.run_sync(file_sha256, path / ONNX_FILE) == old.bundle.onnx_sha256:
                    return ReloadResult(old.model_version, old.model_version, False, 0.0)
            new, seconds = await load_scorer(path, self._settings, refuse_device_problem=True)
        except (OSError, ValueError) as e:  # unreadable path, NUL byte in it, ...
            raise ReloadRefused(422, f"bundle {source!s:.300} cannot be read ({type(e).__name__})") from None
        except BundleError as e:
            raise ReloadRefused(422, f"bundle refused: {e}") from None
        if problem := await self._profiles_the_store_lacks(new.bundle):
            raise ReloadRefused(422, f"bundle refused: {problem}")
        self._state.scorer = new  # the swap: requests that already hold `old` finish on it
        self._metrics.set_model(new.model_version, new.bundle.model_type, seconds)
        previous = old.model_version if old is not None else None
        log.info("model reloaded: %s -> %s in %.2f s", previous, new.model_version, seconds,
                 extra={"model_version": new.model_version, "previous_version": previous})
        return ReloadResult(new.model_version, previous, True, seconds)

    async def _profiles_the_store_lacks(self, bundle: Bundle) -> str | None:
        """Why the store's loaded data cannot feed this model's profile fields, else None.

        Every known user would score with the unknown-profile row (answers degraded), so a
        reload refuses it while the old model serves on. A store that does not answer, or
        has no data loaded yet, cannot say: the reload goes ahead (the batches then degrade
        and log which field is missing, as at start-up).
        """
        wanted, store = bundle.spec.profile_fields, getattr(self._state, "store", None)
        if not wanted or store is None:
            return None
        if (refresh := getattr(store, "refresh_version", None)) is not None:
            try:
                await self._state.store_guard.call("refresh_version", refresh)
            except StoreCallFailed:
                return None
            if store.version is None:
                return None
        kept = store.profile_fields
        if missing := [f for f in wanted if f not in kept]:
            return (
                f"bundle {bundle.path} reads profile field(s) {missing} that the store's loaded data does not keep "
                f"(it has {list(kept)}): load data with them (din load) before this model, or serve one without them"
            )
        return None
