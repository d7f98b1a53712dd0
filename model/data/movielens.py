"""MovieLens ratings as a behaviour log, under the DIN paper's protocol.

Protocol (DIN paper, section 6.1): a rating of 4 or 5 is a click (label 1), any lower
rating is not (label 0); the movie's genre is its category, the FIRST listed genre when
there are several; users are split into train and test by the sample builder (so `split`
stays None here); the history of a target is the user's earlier RATED movies, liked or not
(`is_behaviour` is True for every rating: the user chose to watch it), so a history is not
limited to the clicks. Every rating is also a sample, labelled by the rule above.

Category ids are the same in every format: 0 is the "unknown genre" (ml-100k's `unknown`
flag, no flag at all, `(no genres listed)`, or a movie missing from the movie file);
1..18 are the 18 classic genres in `GENRES` order (ml-100k's `u.genre` ids); genres beyond
those (e.g. IMAX in ml-20m) get 19, 20, ... in sorted name order.

User profiles (ml-100k, ml-1m only): `age` (bucket 0..6, ml-1m's buckets under 18, 18-24,
25-34, 35-44, 45-49, 50-55, 56+), `gender` (F 0, M 1), `occupation` (ml-1m's code 0..20;
in ml-100k the line number in `u.occupation`, or the sorted name index without that file).
User and movie ids stay the dataset's own.

Formats, detected from the files present:
- ml-100k: `u.data` (tab: user item rating ts), `u.item` (pipe, latin-1, 19 genre flags),
  `u.user` (pipe: id|age|gender|occupation|zip)
- ml-1m / ml-10m: `ratings.dat`, `movies.dat`, `users.dat` (ml-1m only), `::`-separated
- ml-20m / ml-25m / ml-latest / ml-latest-small: `ratings.csv`, `movies.csv`
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from model.data.download import download_movielens  # noqa: F401  (re-exported for users)
from model.data.log import BehaviourLog, LogFormatError, UserProfiles

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
UNKNOWN_GENRE = 0
_GENRE_ALIASES = {"Children": "Children's", "(no genres listed)": "unknown", "": "unknown"}
AGE_BUCKET_STARTS = np.array([18, 25, 35, 45, 50, 56], dtype=np.int64)
CLICK_RATING = 4.0

_EXPECTED = (
    "u.data + u.item [+ u.user] (ml-100k), ratings.dat + movies.dat [+ users.dat] "
    "(ml-1m, ml-10m), or ratings.csv + movies.csv (ml-20m, ml-25m, ml-latest, ml-latest-small)"
)


def genre_ids(names: np.ndarray) -> np.ndarray:
    """int64 category ids of genre names (see the module docstring for the numbering)."""
    names = np.asarray([_GENRE_ALIASES.get(str(n), str(n)) for n in names], dtype=object)
    known = {g: i for i, g in enumerate(GENRES)}
    extra = sorted({n for n in names if n not in known})
    table = known | {g: len(GENRES) + i for i, g in enumerate(extra)}
    return np.array([table[n] for n in names], dtype=np.int64)


def age_bucket(age: np.ndarray) -> np.ndarray:
    """ml-1m's age buckets as ids 0..6; ml-1m's own codes (1, 18, 25, ...) map to themselves' bucket."""
    return np.searchsorted(AGE_BUCKET_STARTS, np.asarray(age, dtype=np.int64), side="right").astype(np.int64)


def _gender_id(values: np.ndarray, path: Path) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    bad = sorted({str(v) for v in values if v not in ("F", "M")})
    if bad:
        raise LogFormatError(f"{path}: gender must be F or M, found {', '.join(bad[:5])}")
    return (values == "M").astype(np.int64)


def _read_table(data: Path | io.BytesIO, names: list[str], types: dict[str, pa.DataType], delimiter: str,
                path: Path, encoding: str = "utf8", header: bool = False) -> pa.Table:
    """pyarrow's multi-threaded CSV reader with a readable error naming the file."""
    read = pacsv.ReadOptions(
        column_names=None if header else names, encoding=encoding, block_size=1 << 24
    )
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if header else False)
    convert = pacsv.ConvertOptions(column_types=types, include_columns=list(types))  # only what we use
    try:
        return pacsv.read_csv(data, read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, KeyError) as e:
        raise LogFormatError(f"{path}: cannot be read as MovieLens ({names}): {e}") from None


def _cate_of(item_id: np.ndarray, movie_id: np.ndarray, movie_cate: np.ndarray) -> np.ndarray:
    """Each rated item's category; items missing from the movie file get the unknown genre."""
    order = np.argsort(movie_id, kind="stable")
    ids, cates = movie_id[order], movie_cate[order]
    if ids.size == 0:
        return np.full(item_id.shape, UNKNOWN_GENRE, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, item_id), ids.size - 1)
    return np.where(ids[pos] == item_id, cates[pos], UNKNOWN_GENRE).astype(np.int64)


def _ratings_log(ratings: pa.Table, movie_id: np.ndarray, movie_cate: np.ndarray,
                 profiles: UserProfiles | None, name: str, path: Path) -> BehaviourLog:
    for col in ratings.column_names:
        if ratings.column(col).null_count:
            raise LogFormatError(f"{path}: column {col!r} has {ratings.column(col).null_count} empty values")
    item_id = ratings.column("item_id").to_numpy()
    rating = ratings.column("rating").to_numpy()
    return BehaviourLog(
        user_id=ratings.column("user_id").to_numpy().astype(np.int64, copy=False),
        item_id=item_id.astype(np.int64, copy=False),
        cate_id=_cate_of(item_id, movie_id, movie_cate),
        timestamp=ratings.column("timestamp").to_numpy().astype(np.int64, copy=False),
        label=(rating >= CLICK_RATING).astype(np.int8),
        profiles=profiles,
        name=name,
        is_behaviour=np.ones(len(item_id), dtype=bool),  # every rated movie enters histories
    )


_RATING_TYPES = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
_RATING_NAMES = ["user_id", "item_id", "rating", "timestamp"]


def _load_100k(root: Path) -> BehaviourLog:
    ratings = _read_table(root / "u.data", _RATING_NAMES, _RATING_TYPES, "\t", root / "u.data")
    item_path = root / "u.item"
    if not item_path.is_file():
        raise LogFormatError(f"{root}: ml-100k needs u.item (the genres) next to u.data")
    flag_names = [f"g{i}" for i in range(len(GENRES))]
    items = _read_table(
        item_path, ["movie_id", "title", "release", "video", "url", *flag_names],
        {"movie_id": pa.int64(), **{g: pa.int64() for g in flag_names}}, "|", item_path, encoding="latin-1",
    )
    flags = np.column_stack([items.column(g).to_numpy() for g in flag_names]) > 0  # (M, 19)
    real = flags[:, 1:]  # flag 0 is "unknown"; a real genre listed next to it wins
    movie_cate = np.where(real.any(axis=1), real.argmax(axis=1) + 1, UNKNOWN_GENRE).astype(np.int64)

    profiles = None
    user_path = root / "u.user"
    if user_path.is_file():
        users = _read_table(
            user_path, ["user_id", "age", "gender", "occupation", "zip"],
            {"user_id": pa.int64(), "age": pa.int64(), "gender": pa.string(), "occupation": pa.string()},
            "|", user_path, encoding="latin-1",
        )
        occ = users.column("occupation").to_numpy(zero_copy_only=False)
        occ_path = root / "u.occupation"
        names = (
            [s.strip() for s in occ_path.read_text(encoding="latin-1").splitlines() if s.strip()]
            if occ_path.is_file() else sorted(set(occ))
        )
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(occ) - set(index))
        if unknown:
            raise LogFormatError(f"{user_path}: occupation(s) {', '.join(unknown[:5])} not listed in {occ_path}")
        profiles = UserProfiles(
            user_id=users.column("user_id").to_numpy(),
            fields={
                "age": age_bucket(users.column("age").to_numpy()),
                "gender": _gender_id(users.column("gender").to_numpy(zero_copy_only=False), user_path),
                "occupation": np.array([index[o] for o in occ], dtype=np.int64),
            },
        )
    return _ratings_log(ratings, items.column("movie_id").to_numpy(), movie_cate, profiles,
                        f"movielens:{root.name}", root / "u.data")


def _dat_lines(path: Path) -> list[list[str]]:
    """`::`-separated lines of a small .dat file (titles may hold single colons)."""
    return [line.split("::") for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def _load_dat(root: Path) -> BehaviourLog:
    rating_path = root / "ratings.dat"
    # `::` is not a single-char delimiter; the rating lines are all numbers, so a tab is safe.
    data = io.BytesIO(rating_path.read_bytes().replace(b"::", b"\t"))
    ratings = _read_table(data, _RATING_NAMES, _RATING_TYPES, "\t", rating_path)
    movie_path = root / "movies.dat"
    if not movie_path.is_file():
        raise LogFormatError(f"{root}: ml-1m needs movies.dat (the genres) next to ratings.dat")
    movies = _dat_lines(movie_path)
    short = next((i for i, m in enumerate(movies) if len(m) < 3), None)
    if short is not None:  # without it the title would be taken for the genres
        raise LogFormatError(f"{movie_path}: line {short + 1} has no Genres field; expected MovieID::Title::Genres lines")
    try:
        movie_id = np.array([int(m[0]) for m in movies], dtype=np.int64)
        first_genre = np.array([m[-1].split("|")[0] for m in movies], dtype=object)  # the last field: the genres
    except ValueError as e:
        raise LogFormatError(f"{movie_path}: expected MovieID::Title::Genres lines ({e})") from None

    profiles = None
    user_path = root / "users.dat"
    if user_path.is_file():
        users = _dat_lines(user_path)
        try:
            fields = np.array([u[:4] for u in users], dtype=object)  # id, gender, age, occupation
            profiles = UserProfiles(
                user_id=fields[:, 0].astype(np.int64),
                fields={
                    "age": age_bucket(fields[:, 2].astype(np.int64)),
                    "gender": _gender_id(fields[:, 1], user_path),
                    "occupation": fields[:, 3].astype(np.int64),
                },
            )
        except (ValueError, IndexError) as e:
            raise LogFormatError(f"{user_path}: expected UserID::Gender::Age::Occupation::Zip lines ({e})") from None
    return _ratings_log(ratings, movie_id, genre_ids(first_genre), profiles, f"movielens:{root.name}", rating_path)


def _load_csv(root: Path) -> BehaviourLog:
    rating_path, movie_path = root / "ratings.csv", root / "movies.csv"
    ratings = _read_table(
        rating_path, ["userId", "movieId", "rating", "timestamp"],
        {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()},
        ",", rating_path, header=True,
    ).rename_columns(_RATING_NAMES)
    if not movie_path.is_file():
        raise LogFormatError(f"{root}: needs movies.csv (the genres) next to ratings.csv")
    movies = _read_table(movie_path, ["movieId", "genres"], {"movieId": pa.int64(), "genres": pa.string()},
                         ",", movie_path, header=True)
    genres = pc.fill_null(movies.column("genres"), "")
    first = pc.list_element(pc.split_pattern(genres, "|"), 0).to_numpy(zero_copy_only=False)
    return _ratings_log(ratings, movies.column("movieId").to_numpy(), genre_ids(first), None,
                        f"movielens:{root.name}", rating_path)


_FORMATS = (("u.data", _load_100k), ("ratings.dat", _load_dat), ("ratings.csv", _load_csv))


def load_movielens(path: str | Path) -> BehaviourLog:
    """Read an extracted MovieLens directory (any of the formats above) into a BehaviourLog.

    A directory that holds exactly one dataset directory (a zip's parent) is accepted too.
    """
    if str(path) == "":
        raise LogFormatError("movielens needs the path of an extracted MovieLens folder (data spec movielens:PATH)")
    root = Path(path)
    if not root.is_dir():
        raise LogFormatError(f"{root}: not a directory; pass the extracted MovieLens folder holding {_EXPECTED}")
    for marker, loader in _FORMATS:
        if (root / marker).is_file():
            return loader(root)
    subdirs = [d for d in root.iterdir() if d.is_dir() and any((d / m).is_file() for m, _ in _FORMATS)]
    if len(subdirs) == 1:
        return load_movielens(subdirs[0])
    found = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
    raise LogFormatError(f"{root}: no MovieLens files found (found: {found}); expected {_EXPECTED}")
