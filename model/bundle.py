"""The model bundle: a directory the trainer writes atomically and the service reads.

Layout (DESIGN.md, contract 1):

    <bundle>/model.onnx
    <bundle>/bundle.json          format version, model version/type, feature spec, ...
    <bundle>/vocab/<field>.npy    sorted int64 raw ids; row = index + FIRST_ID_ROW

Format 2 adds hashed fields (model/hashing.py): bundle.json's `id_mapping.<field>` names
the hash function and the bucket count, and such a field has no vocab file. A bundle
without hashed fields is still written as format 1, so older services keep reading it;
this code reads both.

Torch-free: the service imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from model.contract import OUTPUT_NAMES, FeatureSpec, Vocabulary
from model.hashing import HashedIds, IdMapping

BUNDLE_FORMAT_VERSION = 1  # vocabularies only
HASHED_FORMAT_VERSION = 2  # some fields hashed (`id_mapping` in bundle.json)
SUPPORTED_FORMAT_VERSIONS = (BUNDLE_FORMAT_VERSION, HASHED_FORMAT_VERSION)
MANIFEST = "bundle.json"
ONNX_FILE = "model.onnx"
VOCAB_DIR = "vocab"


class BundleError(Exception):
    """A bundle that cannot be served; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    spec: FeatureSpec
    vocabularies: dict[str, IdMapping]  # Vocabulary, or HashedIds for a hashed field
    onnx_sha256: str | None = None  # of model.onnx when loaded: a reload can tell a changed file under the same name

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def model_type(self) -> str:
        return str(self.manifest["model_type"])

    @property
    def has_attention(self) -> bool:
        return bool(self.manifest.get("has_attention", False))


def finite(obj):
    """NaN -> null, so what we write is strict JSON (e.g. GAUC of a split where every user has one class)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def new_model_version(model_type: str, fingerprint: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{model_type}-{stamp}-{fingerprint[:8]}"


def write_bundle(
    out_dir: Path,
    *,
    model_version: str,
    model_type: str,
    spec: FeatureSpec,
    vocabularies: dict[str, IdMapping],
    onnx_bytes: bytes,
    extra: dict,
) -> Path:
    """Write `<out_dir>/<model_version>/` atomically: build in a temp dir, then rename."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / model_version
    if final.exists():
        raise BundleError(f"bundle {final} already exists; refusing to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_version}.", dir=out_dir))
    try:
        (tmp / ONNX_FILE).write_bytes(onnx_bytes)
        (tmp / VOCAB_DIR).mkdir()
        hashed = {name: m.to_json() for name, m in vocabularies.items() if isinstance(m, HashedIds)}
        for name, vocab in vocabularies.items():
            if name not in hashed:
                np.save(tmp / VOCAB_DIR / f"{name}.npy", vocab.ids)
        manifest = {
            "format_version": HASHED_FORMAT_VERSION if hashed else BUNDLE_FORMAT_VERSION,
            **({"id_mapping": hashed} if hashed else {}),
            "model_version": model_version,
            "model_type": model_type,
            "feature_spec": spec.to_json(),
            "onnx": {"file": ONNX_FILE, "inputs": spec.input_names(), "outputs": list(OUTPUT_NAMES)},
            "created_at": datetime.now(timezone.utc).isoformat(),
            **extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(finite(manifest), indent=2, sort_keys=True, allow_nan=False))
        tmp.chmod(0o755)  # mkdtemp makes it private; serving images run as another user
        os.replace(tmp, final)  # atomic on one filesystem
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read and validate a bundle; every failure is a BundleError with a clear message."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist; train one with `din train`")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a model bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{manifest_path} is not valid JSON ({e}); the bundle is corrupt") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an object; the bundle is corrupt")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"bundle format version {version!r} is not supported (this service reads versions "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-export the model with a matching `din train`"
        )
    try:
        spec = FeatureSpec.from_json(manifest["feature_spec"])
        for key in ("model_version", "model_type"):
            manifest[key]
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # AttributeError: an entry of the wrong JSON type
        raise BundleError(f"{manifest_path} lacks a required entry or has one of the wrong type ({e!r}); the bundle is corrupt") from None
    if not (path / ONNX_FILE).is_file():
        raise BundleError(f"{path / ONNX_FILE} is missing; the bundle is incomplete")
    vocabularies: dict[str, IdMapping] = {}
    id_mapping = manifest.get("id_mapping", {}) if version == HASHED_FORMAT_VERSION else {}
    for name in (*spec.sequence_fields, *spec.profile_fields):
        if name in id_mapping:
            try:
                hashed = HashedIds.from_json(id_mapping[name])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise BundleError(f"{manifest_path}: id_mapping.{name} is not usable ({e!r}); re-export the model") from None
            if hashed.num_rows != spec.vocab_sizes.get(name):
                raise BundleError(
                    f"{manifest_path}: id_mapping.{name} has {hashed.num_rows} rows but the feature spec "
                    f"says {spec.vocab_sizes.get(name)}; the bundle is corrupt"
                )
            vocabularies[name] = hashed
            continue
        vocab_path = path / VOCAB_DIR / f"{name}.npy"
        try:
            vocab = Vocabulary(np.load(vocab_path, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty or truncated .npy
            raise BundleError(f"vocabulary {vocab_path} cannot be read ({e!r}); the bundle is corrupt") from None
        if vocab.num_rows != spec.vocab_sizes.get(name):
            raise BundleError(
                f"vocabulary {vocab_path} has {vocab.num_rows} rows but bundle.json says "
                f"{spec.vocab_sizes.get(name)}; the bundle is corrupt"
            )
        vocabularies[name] = vocab
    return Bundle(path=path, manifest=manifest, spec=spec, vocabularies=vocabularies, onnx_sha256=file_sha256(path / ONNX_FILE))


def file_sha256(path: Path) -> str | None:
    """The file's sha256 (hex), None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


LATEST = "latest"


def update_latest(out_dir: Path, bundle: Path) -> None:
    """Point `<out_dir>/latest` at `bundle` atomically (a relative symlink swapped by rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".{LATEST}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(bundle).name, tmp)
    os.replace(tmp, out_dir / LATEST)


def resolve_bundle_path(path: str | os.PathLike) -> Path:
    """A bundle dir as given, or the newest bundle of a directory of bundles.

    `artifacts/bundles` and `artifacts/bundles/latest` both name the newest model, so a
    deployment can point at the directory and pick up a new version on reload.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST / MANIFEST).is_file():
        return (path / LATEST).resolve()
    if path.is_dir():
        candidates = [p for p in path.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()]
        if candidates:
            return max(candidates, key=lambda p: (p / MANIFEST).stat().st_mtime)
    raise BundleError(
        f"no model bundle at {path} (expected {MANIFEST} there or in a bundle below it); "
        f"train one with `din train --out {path}`"
    )
