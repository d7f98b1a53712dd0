"""Fetching the public datasets, only when the user asks for it.

Nothing else in the project touches the network: the loaders read local files, and the
tests write their own small files. `base_url` exists for mirrors (and `file://` URLs).
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"
# name -> the directory its zip extracts to (ml-10m is the one whose name differs)
MOVIELENS_DATASETS = {
    "ml-100k": "ml-100k",
    "ml-1m": "ml-1m",
    "ml-10m": "ml-10M100K",
    "ml-20m": "ml-20m",
    "ml-25m": "ml-25m",
    "ml-32m": "ml-32m",
    "ml-latest": "ml-latest",
    "ml-latest-small": "ml-latest-small",
}

# The DIN paper's Amazon data: McAuley's 2014 product graph (5-core reviews + metadata).
AMAZON_2014_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
# The 2018 release (metadata with `category` / `main_cat` instead of `categories`).
AMAZON_2018_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"


class DownloadError(RuntimeError):
    """A download or extraction that failed; the message names the URL or file."""


def fetch(url: str, path: Path) -> Path:
    """Download `url` to `path` atomically (temp file, then rename), with a progress bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"cannot download {url}: {e}") from None
    tmp.replace(path)
    return path


def _extract(archive: Path, dest: Path) -> None:
    """Unzip into `dest`, refusing members that would land outside it."""
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (dest / member).resolve()
                if target != root and root not in target.parents:
                    raise DownloadError(f"{archive}: member {member!r} would extract outside {dest}")
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a zip file ({e})") from None


def download_movielens(name: str, dest: Path, *, base_url: str = GROUPLENS_URL) -> Path:
    """Download and unzip a GroupLens MovieLens dataset into `dest`; returns its directory.

    An already extracted dataset is returned as is, without touching the network.
    """
    if name not in MOVIELENS_DATASETS:
        raise DownloadError(f"unknown MovieLens dataset {name!r}; choose one of {', '.join(MOVIELENS_DATASETS)}")
    dest = Path(dest)
    target = dest / MOVIELENS_DATASETS[name]
    if target.is_dir() and any(target.iterdir()):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = fetch(f"{base_url.rstrip('/')}/{name}.zip", Path(tmp) / f"{name}.zip")
        staging = Path(tmp) / "x"
        _extract(archive, staging)
        extracted = staging / MOVIELENS_DATASETS[name]
        if not extracted.is_dir():
            found = ", ".join(sorted(p.name for p in staging.iterdir()))
            raise DownloadError(f"{name}.zip did not contain {MOVIELENS_DATASETS[name]}/ (found: {found})")
        shutil.move(str(extracted), str(target))
    return target


def amazon_urls(
    category: str = "Electronics", *, version: str = "2014", base_url: str | None = None
) -> tuple[str, str]:
    """(5-core reviews URL, metadata URL) of one Amazon category in McAuley's releases."""
    if version == "2014":
        base = (base_url or AMAZON_2014_URL).rstrip("/")
        return f"{base}/reviews_{category}_5.json.gz", f"{base}/meta_{category}.json.gz"
    if version == "2018":
        base = (base_url or AMAZON_2018_URL).rstrip("/")
        return f"{base}/categoryFilesSmall/{category}_5.json.gz", f"{base}/metaFiles2/meta_{category}.json.gz"
    raise DownloadError(f"unknown Amazon release {version!r}; choose 2014 (the DIN paper's) or 2018")


def download_amazon(
    dest: Path, category: str = "Electronics", *, version: str = "2014", base_url: str | None = None
) -> Path:
    """Download one category's 5-core reviews and metadata into `dest` (kept gzipped).

    Returns `dest`, which `load_amazon` then reads. Files already there are not fetched again.
    """
    dest = Path(dest)
    for url in amazon_urls(category, version=version, base_url=base_url):
        path = dest / url.rsplit("/", 1)[1]
        if not path.is_file():
            fetch(url, path)
    return dest
