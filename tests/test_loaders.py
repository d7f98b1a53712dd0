"""MovieLens and Amazon loaders: each protocol pinned on tiny files written here, plus ml-100k when present."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from model.data.amazon import UNKNOWN_CATEGORY, load_amazon, load_amazon_dataset
from model.data.download import DownloadError, download_movielens
from model.data.log import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, LogFormatError, read_log
from model.data.movielens import load_movielens
from model.data.sources import load_source

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"


# ---------------------------------------------------------------- MovieLens

def _flags(*genres: int) -> str:
    return "|".join("1" if g in genres else "0" for g in range(19))


def write_ml100k(root: Path, occupation_file: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "u.data").write_text("1\t10\t5\t100\n1\t20\t3\t200\n2\t10\t4\t150\n2\t30\t1\t50\n3\t40\t4\t300\n")
    items = [
        f"10|Café (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}",  # Animation first of three
        f"20|Two (1996)|01-Jan-1996||http://y|{_flags(0, 8)}",  # unknown flag + Drama -> Drama
        f"30|Three (1997)|01-Jan-1997||http://z|{_flags()}",  # no flag -> unknown genre
    ]
    (root / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (root / "u.user").write_text("1|17|M|writer|12345\n2|53|F|administrator|T8H1N\n3|56|M|none|00000\n")
    if occupation_file:
        (root / "u.occupation").write_text("writer\nadministrator\nnone\n")  # not sorted on purpose
    return root


def test_ml100k_format(tmp_path: Path) -> None:
    log = load_movielens(write_ml100k(tmp_path / "ml-100k"))
    np.testing.assert_array_equal(log.user_id, [1, 1, 2, 2, 3])
    np.testing.assert_array_equal(log.item_id, [10, 20, 10, 30, 40])
    np.testing.assert_array_equal(log.timestamp, [100, 200, 150, 50, 300])
    np.testing.assert_array_equal(log.label, [1, 0, 1, 0, 1])  # ratings 5 3 4 1 4
    np.testing.assert_array_equal(log.cate_id, [3, 8, 3, 0, 0])  # item 40 is not in u.item -> unknown
    for col in (log.user_id, log.item_id, log.cate_id, log.timestamp):
        assert col.dtype == np.int64
    p = log.profiles
    np.testing.assert_array_equal(p.user_id, [1, 2, 3])
    np.testing.assert_array_equal(p.fields["age"], [0, 5, 6])  # 17, 53, 56
    np.testing.assert_array_equal(p.fields["gender"], [1, 0, 1])
    np.testing.assert_array_equal(p.fields["occupation"], [0, 1, 2])  # u.occupation line order
    assert log.is_behaviour.dtype == bool and log.is_behaviour.all()  # every rating enters histories
    assert log.split is None


def test_ml100k_without_occupation_file_uses_sorted_names(tmp_path: Path) -> None:
    log = load_movielens(write_ml100k(tmp_path / "ml", occupation_file=False))
    np.testing.assert_array_equal(log.profiles.fields["occupation"], [2, 0, 1])  # administrator none writer


def write_ml1m(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::2::3::978302109\n2::3::4::978301968\n3::2::2::978300275\n"
    )
    (root / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "2::Jumanji: the Game (1995)::Adventure|Children's|Fantasy\n"
        "3::Título (1995)::Children's\n".encode("latin-1")
    )
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    return root


def test_ml1m_format(tmp_path: Path) -> None:
    log = load_movielens(write_ml1m(tmp_path / "ml-1m"))
    np.testing.assert_array_equal(log.user_id, [1, 1, 2, 3])
    np.testing.assert_array_equal(log.item_id, [1193, 2, 3, 2])
    np.testing.assert_array_equal(log.timestamp, [978300760, 978302109, 978301968, 978300275])
    np.testing.assert_array_equal(log.label, [1, 0, 1, 0])
    np.testing.assert_array_equal(log.cate_id, [8, 2, 4, 2])  # Drama, Adventure, Children's
    p = log.profiles
    np.testing.assert_array_equal(p.user_id, [1, 2, 3])
    np.testing.assert_array_equal(p.fields["age"], [0, 6, 2])  # ml-1m codes 1, 56, 25
    np.testing.assert_array_equal(p.fields["gender"], [0, 1, 1])
    np.testing.assert_array_equal(p.fields["occupation"], [10, 16, 15])


def test_ml1m_movie_without_genres_is_an_error_not_a_category(tmp_path: Path) -> None:
    """Its last `::` field would be the title, taken for a genre."""
    root = write_ml1m(tmp_path / "ml-1m")
    (root / "movies.dat").write_text("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n2::Jumanji (1995)\n3::Heat (1995)::Action\n")
    with pytest.raises(LogFormatError, match=r"movies\.dat: line 2 has no Genres field"):
        load_movielens(root)


def test_ids_beyond_int64_are_refused_naming_the_file_and_column(tmp_path: Path) -> None:
    """64-bit hash ids: as CSV doubles they used to collapse into one id; as uint64 Parquet the
    error named neither file nor column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = 2**64 - 1
    csv = tmp_path / "hashed.csv"
    csv.write_text(f"user_id,item_id,cate_id,timestamp\n{big},1,1,1\n{big - 2**12},2,1,2\n1,3,1,3\n")
    with pytest.raises(LogFormatError, match=r"hashed\.csv: column 'user_id' holds values outside int64"):
        read_log(csv)
    pq.write_table(pa.table({"user_id": pa.array([big, 1], pa.uint64()), "item_id": [1, 2], "cate_id": [1, 1], "timestamp": [1, 2]}),
                   tmp_path / "hashed.parquet")  # fmt: skip
    with pytest.raises(LogFormatError, match=r"hashed\.parquet: column 'user_id' holds values outside int64"):
        read_log(tmp_path / "hashed.parquet")


def write_ml_csv(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n1,2,3.5,964981247\n2,3,5.0,964982224\n2,4,0.5,964983815\n"
        "3,5,4.5,964982931\n3,6,3.0,964982400\n"
    )
    (root / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Big Screen (2010),IMAX|Documentary\n"
        "4,Kids (2001),Children\n"
        "5,Nothing (2015),(no genres listed)\n"
        "6,Late (2019),Adult\n"
    )
    return root


def test_csv_format(tmp_path: Path) -> None:
    log = load_movielens(write_ml_csv(tmp_path / "ml-latest-small"))
    np.testing.assert_array_equal(log.user_id, [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(log.item_id, [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(log.label, [1, 0, 1, 0, 1, 0])  # 4.0 3.5 5.0 0.5 4.5 3.0
    # Adventure 2, Comedy 5, IMAX (extra, after Adult) 20, Children -> Children's 4, none -> 0, Adult 19
    np.testing.assert_array_equal(log.cate_id, [2, 5, 20, 4, 0, 19])
    assert log.profiles is None


def test_detects_nested_folder_and_names_expected_files(tmp_path: Path) -> None:
    write_ml_csv(tmp_path / "downloads" / "ml-latest-small")
    assert len(load_movielens(tmp_path / "downloads")) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogFormatError, match=r"u\.data.*ratings\.dat.*ratings\.csv"):
        load_movielens(tmp_path / "empty")
    broken = write_ml100k(tmp_path / "broken")
    (broken / "u.item").unlink()
    with pytest.raises(LogFormatError, match="u.item"):
        load_movielens(broken)


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="../shared/datasets/ml-100k not present")
def test_real_ml100k() -> None:
    log = load_movielens(ML100K)
    assert len(log) == 100_000
    assert np.unique(log.user_id).size == 943
    assert np.unique(log.item_id).size == 1682
    assert int(log.label.sum()) == 55_375  # ratings >= 4 (counted from u.data with awk)
    assert int(log.cate_id.min()) == 0 and int(log.cate_id.max()) == 18
    cate_of = dict(zip(log.item_id.tolist(), log.cate_id.tolist()))
    assert (cate_of[1], cate_of[2], cate_of[267]) == (3, 1, 0)  # Toy Story: Animation; GoldenEye: Action; unknown
    assert int((log.cate_id == 0).sum()) == 10
    p = log.profiles
    assert p.user_id.size == 943
    first = p.lookup(np.array([1, 2], dtype=np.int64))  # 1|24|M|technician, 2|53|F|other
    np.testing.assert_array_equal(first["age"], [1, 5])
    np.testing.assert_array_equal(first["gender"], [1, 0])
    np.testing.assert_array_equal(first["occupation"], [19, 13])
    assert len(load_source(f"movielens:{ML100K}")) == 100_000


def _zip_dir(src: Path, archive: Path, arcroot: str) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"{arcroot}/{f.name}")


def test_download_movielens_from_a_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _zip_dir(write_ml_csv(tmp_path / "src"), mirror / "ml-latest-small.zip", "ml-latest-small")
    _zip_dir(write_ml1m(tmp_path / "src10"), mirror / "ml-10m.zip", "ml-10M100K")
    got = download_movielens("ml-latest-small", tmp_path / "data", base_url=mirror.as_uri())
    assert got == tmp_path / "data" / "ml-latest-small"
    assert int(load_movielens(got).label.sum()) == 3
    ten = download_movielens("ml-10m", tmp_path / "data", base_url=mirror.as_uri())
    assert ten.name == "ml-10M100K" and len(load_movielens(ten)) == 4
    (mirror / "ml-latest-small.zip").unlink()  # already extracted: no second fetch
    assert download_movielens("ml-latest-small", tmp_path / "data", base_url=mirror.as_uri()) == got
    with pytest.raises(DownloadError, match="ml-latest-small.zip"):
        download_movielens("ml-latest-small", tmp_path / "other", base_url=mirror.as_uri())
    with pytest.raises(DownloadError, match="unknown MovieLens dataset 'ml-5k'"):
        download_movielens("ml-5k", tmp_path / "data")
    with zipfile.ZipFile(mirror / "ml-1m.zip", "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        download_movielens("ml-1m", tmp_path / "data", base_url=mirror.as_uri())
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------- Amazon

# (reviewerID, asin, unixReviewTime) in file order; U1's second B002 is a repeat (dropped);
# U2's B007 and B002 tie at t=500, so file order makes B002 the last (test) review.
REVIEWS = [
    ("U2", "B003", 300), ("U1", "B001", 100), ("U1", "B002", 200), ("U2", "B001", 100),
    ("U1", "B004", 400), ("U1", "B003", 300), ("U2", "B007", 500), ("U2", "B005", 200),
    ("U1", "B002", 500), ("U3", "B006", 50), ("U3", "B001", 60), ("U2", "B002", 500),
]
META_LINES = [
    json.dumps({"asin": "B001", "categories": [["Electronics", "Computers", "Cables"], ["Other"]]}),
    str({"asin": "B002", "categories": [["Electronics", "Headphones"]], "title": "Bob's", "price": None}),
    json.dumps({"asin": "B003", "category": ["Electronics", "Cameras"], "main_cat": "Camera"}),
    json.dumps({"asin": "B004", "category": [], "main_cat": "All Electronics"}),
    "",
    str({"asin": "B005", "categories": [["Electronics", "Cables"]], "related": {"also_bought": ["B001"]}}),
    json.dumps({"asin": "B006", "title": "no category"}),
    str({"asin": "B999", "categories": [["Zzz never reviewed"]]}),  # B007 has no metadata at all
]


def write_amazon(root: Path, gz: bool) -> Path:
    root.mkdir(parents=True)
    reviews = "".join(
        json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0, "reviewText": "ok"}) + "\n"
        for u, a, t in REVIEWS
    )
    meta = "\n".join(META_LINES) + "\n"
    if gz:
        (root / "reviews_Electronics_5.json.gz").write_bytes(gzip.compress(reviews.encode()))
        (root / "meta_Electronics.json.gz").write_bytes(gzip.compress(meta.encode()))
    else:
        (root / "Electronics_5.json").write_text(reviews)
        (root / "meta_Electronics.json").write_text(meta)
    return root


def test_amazon_ids_categories_and_split(tmp_path: Path) -> None:
    ds = load_amazon_dataset(write_amazon(tmp_path / "plain", gz=False), seed=0)
    assert ds.users.tolist() == ["U1", "U2", "U3"]
    assert ds.items.tolist() == [f"B00{i}" for i in range(1, 8)]
    assert ds.categories.tolist() == ["<unknown>", "All Electronics", "Cables", "Cameras", "Headphones"]
    assert (ds.reviews, ds.duplicates_dropped) == (11, 1)
    log = ds.log
    assert len(log) == 22
    beh = log.is_behaviour
    np.testing.assert_array_equal(beh, np.tile([True, False], 11))
    np.testing.assert_array_equal(log.label, beh.astype(np.int8))
    # The reviews, per user oldest first: B00k -> item k-1; categories from the metadata.
    np.testing.assert_array_equal(log.user_id[beh], [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(log.item_id[beh], [0, 1, 2, 3, 0, 4, 2, 6, 1, 5, 0])
    np.testing.assert_array_equal(log.timestamp[beh], [100, 200, 300, 400, 100, 200, 300, 500, 500, 50, 60])
    np.testing.assert_array_equal(log.cate_id[beh], [2, 4, 3, 1, 2, 2, 3, UNKNOWN_CATEGORY, 4, UNKNOWN_CATEGORY, 2])
    T, V, S = SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST
    np.testing.assert_array_equal(log.split[beh], [T, T, V, S, T, T, T, V, S, V, S])
    # Each negative shares its review's user, time and split, and has its own item's category.
    for col in (log.user_id, log.timestamp, log.split):
        np.testing.assert_array_equal(col[~beh], col[beh])
    cate_of_item = np.array([2, 4, 3, 1, 2, 0, 0])
    np.testing.assert_array_equal(log.cate_id, cate_of_item[log.item_id])
    for col in (log.user_id, log.item_id, log.cate_id, log.timestamp):
        assert col.dtype == np.int64
    assert log.split.dtype == np.int8 and log.is_behaviour.dtype == bool


def test_amazon_negatives_never_reviewed_by_the_user(tmp_path: Path) -> None:
    for seed in range(20):
        log = load_amazon(write_amazon(tmp_path / f"s{seed}", gz=False), seed=seed)
        reviewed = {(u, i) for u, i in zip(log.user_id[log.is_behaviour], log.item_id[log.is_behaviour])}
        negs = list(zip(log.user_id[~log.is_behaviour].tolist(), log.item_id[~log.is_behaviour].tolist()))
        assert len(negs) == 11 and not reviewed.intersection(negs)


def test_amazon_test_target_is_last_and_never_in_its_history(tmp_path: Path) -> None:
    log = load_amazon(write_amazon(tmp_path / "a", gz=True)).sorted_by_user_time()
    # A stable sort keeps each negative right after its review.
    np.testing.assert_array_equal(log.is_behaviour, np.tile([True, False], 11))
    for u in np.unique(log.user_id):
        mine = log.user_id == u
        beh_items = log.item_id[mine & log.is_behaviour]
        beh_split = log.split[mine & log.is_behaviour]
        assert beh_split[-1] == SPLIT_TEST and (beh_split[:-1] != SPLIT_TEST).all()
        assert beh_split[-2] == SPLIT_VALID and (beh_split[:-2] == SPLIT_TRAIN).all()
        assert beh_items[-1] not in beh_items[:-1]  # the target never sits in its own history
        assert beh_items[-2] not in beh_items[:-2]


def test_amazon_gzip_and_plain_read_the_same(tmp_path: Path) -> None:
    a = load_amazon(write_amazon(tmp_path / "plain", gz=False), seed=3)
    b = load_amazon(write_amazon(tmp_path / "gz", gz=True), seed=3)
    for col in ("user_id", "item_id", "cate_id", "timestamp", "label", "is_behaviour", "split"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert a.fingerprint() == b.fingerprint()
    assert load_source(f"amazon:{tmp_path / 'gz'}").fingerprint() == load_amazon(tmp_path / "gz").fingerprint()


def test_amazon_negatives_are_uniform_and_seeded(tmp_path: Path) -> None:
    root = tmp_path / "uni"
    root.mkdir()
    # 2,000 users who each reviewed I00 only: negatives must spread evenly over I01..I10.
    lines = [{"reviewerID": f"U{u:04d}", "asin": "I00", "unixReviewTime": 1} for u in range(2000)]
    lines += [{"reviewerID": "U9999", "asin": f"I{i:02d}", "unixReviewTime": i} for i in range(1, 11)]
    (root / "reviews.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "meta.json").write_text("")
    log = load_amazon(root, seed=7)
    neg_items = log.item_id[~log.is_behaviour & (log.user_id < 2000)]
    counts = np.bincount(neg_items, minlength=11)
    assert counts[0] == 0 and counts.sum() == 2000
    assert counts[1:].min() > 200 - 60 and counts[1:].max() < 200 + 60  # binomial sd ~13.4
    # U9999 reviewed I01..I10: its only possible negative is I00.
    assert set(log.item_id[~log.is_behaviour & (log.user_id == 2000)].tolist()) == {0}
    again = load_amazon(root, seed=7)
    np.testing.assert_array_equal(again.item_id, log.item_id)
    assert not np.array_equal(load_amazon(root, seed=8).item_id, log.item_id)


def test_amazon_bad_input_names_the_problem(tmp_path: Path) -> None:
    root = write_amazon(tmp_path / "two", gz=False)
    (root / "reviews_more.json").write_text("")
    with pytest.raises(LogFormatError, match="exactly one reviews file"):
        load_amazon(root)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "r.json").write_text(json.dumps({"reviewerID": "U", "asin": "A", "unixReviewTime": 1}) + "\n"
                                + json.dumps({"reviewerID": "U", "asin": "B"}) + "\n")
    (bad / "meta_x.json").write_text("")
    with pytest.raises(LogFormatError, match=r"r\.json, line 2: review has no 'unixReviewTime'"):
        load_amazon(bad)
    (bad / "r.json").write_text("{not json at all\n")
    with pytest.raises(LogFormatError, match="line 1: neither JSON nor a Python literal"):
        load_amazon(bad)
    (bad / "r.json").write_text(json.dumps({"reviewerID": "U", "asin": "A", "unixReviewTime": 1}) + "\n")
    with pytest.raises(LogFormatError, match="reviewed every item"):
        load_amazon(bad)
    # a cut-off download (gzip without its end) and a file that is not UTF-8: the file is named
    whole = gzip.compress(b"".join(json.dumps({"reviewerID": f"U{i}", "asin": "A", "unixReviewTime": i}).encode() + b"\n" for i in range(500)))
    (bad / "r.json").unlink()
    (bad / "r.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LogFormatError, match=r"r\.json\.gz: unreadable after line \d+ \(truncated or corrupt gzip"):
        load_amazon(bad)
    (bad / "r.json.gz").unlink()
    (bad / "r.json").write_bytes(b'{"reviewerID": "caf\xe9", "asin": "A", "unixReviewTime": 1}\n')
    with pytest.raises(LogFormatError, match=r"r\.json: unreadable after line 0 .*not UTF-8"):
        load_amazon(bad)


# ---------------------------------------------------------------- loaders -> samples (the protocols end to end)

def expected_histories(log, samples, max_history):
    """Brute force, per split: (user, [history item rows newest first]) for every sample in order.

    With labels every event of a split is one sample, in (user, time) order; a history is the
    user's behaviours (BehaviourLog.behaviour_mask) strictly before the target's time.
    """
    srt = log.sorted_by_user_time()
    beh = srt.behaviour_mask()
    vocab = samples.vocabularies["item_id"]
    if srt.split is not None:
        split_of = srt.split
    else:
        split_of = np.select(
            [np.isin(srt.user_id, samples.validation.users), np.isin(srt.user_id, samples.test.users)], [1, 2], 0
        )
    out = []
    for which in (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST):
        rows = []
        for r in np.flatnonzero(split_of == which):
            earlier = np.flatnonzero((srt.user_id == srt.user_id[r]) & beh & (srt.timestamp < srt.timestamp[r]))
            newest_first = earlier[::-1][:max_history]
            rows.append((int(srt.user_id[r]), vocab.lookup(srt.item_id[newest_first]).tolist()))
        out.append(rows)
    return out


def sample_histories(samples):
    got = []
    for split in (samples.train, samples.validation, samples.test):
        batch = samples.batch(split, np.arange(len(split)))
        hist = batch.inputs["hist_item_id"].numpy()
        got.append([(int(u), [r for r in h.tolist() if r != 0]) for u, h in zip(split.user_id, hist)])
    return got


def test_amazon_samples_follow_the_din_protocol(tmp_path: Path) -> None:
    from model.data.samples import SampleConfig, build_samples

    log = load_amazon(write_amazon(tmp_path / "a", gz=False), seed=1)
    s = build_samples(log, SampleConfig(max_history=3, seed=0))
    # split from the log's own column: 3 users x (1 test + 1 validation) pairs, the rest train
    assert (len(s.train), len(s.validation), len(s.test)) == (10, 6, 6)
    for split in (s.train, s.validation, s.test):
        np.testing.assert_array_equal(split.label, np.tile([1.0, 0.0], len(split) // 2))
        # a negative has exactly its paired review's history
        np.testing.assert_array_equal(split.hist_start[1::2], split.hist_start[0::2])
        np.testing.assert_array_equal(split.hist_end[1::2], split.hist_end[0::2])
    assert sample_histories(s) == expected_histories(log, s, 3)
    # only the 11 reviews are behaviours: no sampled negative can ever be gathered into a history
    srt = log.sorted_by_user_time()
    reviews = srt.is_behaviour
    assert s.behaviour_rows["item_id"].size == 11
    np.testing.assert_array_equal(s.behaviour_rows["item_id"], s.vocabularies["item_id"].lookup(srt.item_id[reviews]))
    # the test target (each user's last review) sits after every history window of its user
    beh_user, beh_split = srt.user_id[reviews], srt.split[reviews]
    for split in (s.train, s.validation, s.test):
        for u, end in zip(split.user_id, split.hist_end):
            test_pos = np.flatnonzero((beh_user == u) & (beh_split == SPLIT_TEST))
            assert test_pos.size == 1 and end <= test_pos[0]
    # the vocabularies hold training events only (reviews and negatives)
    np.testing.assert_array_equal(s.vocabularies["item_id"].ids, np.unique(srt.item_id[srt.split == SPLIT_TRAIN]))


def test_amazon_split_column_wins_over_the_user_split(tmp_path: Path) -> None:
    from model.data.samples import SampleConfig, build_samples

    log = load_amazon(write_amazon(tmp_path / "a", gz=False))
    s = build_samples(log, SampleConfig(split=(0.8, 0.1, 0.1), seed=5))  # ignored: the log has a split
    # every user in validation and test; U3 has two reviews only, so no training sample
    assert [set(x.users.tolist()) for x in (s.train, s.validation, s.test)] == [{0, 1}, {0, 1, 2}, {0, 1, 2}]


def write_ml100k_rich(root: Path) -> Path:
    """8 users x 6 ratings, clicks and non-clicks interleaved, one same-second pair per user."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, 9):
        items = rng.choice(np.arange(1, 13), 6, replace=False)
        times = np.array([10, 20, 20, 30, 40, 50]) + 100 * u
        for i, t in zip(items, rng.permutation(times)):
            lines.append(f"{u}\t{i}\t{int(rng.integers(1, 6))}\t{t}")
    (root / "u.data").write_text("\n".join(lines) + "\n")
    (root / "u.item").write_bytes(
        "".join(f"{i}|M{i} (1995)|01-Jan-1995||http://x|{_flags(i % 5 + 1)}\n" for i in range(1, 13)).encode("latin-1")
    )
    return root


def test_movielens_samples_follow_the_paper_protocol(tmp_path: Path) -> None:
    from model.data.samples import SampleConfig, build_samples

    log = load_movielens(write_ml100k_rich(tmp_path / "ml"))
    s = build_samples(log, SampleConfig(max_history=4, seed=3))
    # every rating is a sample with its label; users split into disjoint train / validation / test
    assert len(s.train) + len(s.validation) + len(s.test) == 48
    users = [set(x.users.tolist()) for x in (s.train, s.validation, s.test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert all(users)
    # history = the user's earlier RATED movies (liked or not), newest first, truncated: never
    # a later event, never another user's (so never a test user's event in training)
    assert sample_histories(s) == expected_histories(log, s, 4)
    assert sum(len(h) for part in sample_histories(s) for _, h in part) > 20  # not vacuous
    # every one of the 48 ratings is a behaviour, the disliked ones (rating < 4) too
    assert s.behaviour_rows["item_id"].size == 48 and (log.label == 0).sum() > 5


def test_event_log_samples_without_labels_use_every_event(tmp_path: Path) -> None:
    from model.data.log import BehaviourLog, write_log
    from model.data.samples import SampleConfig, build_samples

    rng = np.random.default_rng(1)
    n = 60
    log = BehaviourLog(
        user_id=rng.integers(1, 11, n), item_id=rng.integers(1, 20, n), cate_id=rng.integers(1, 4, n),
        timestamp=rng.integers(0, 30, n),
    )
    path = write_log(log, tmp_path / "events.csv")
    read = load_source(f"events:{path}")
    s = build_samples(read, SampleConfig(max_history=5, seed=2))
    # positives in (user, time) order, each followed by its negative with the same history
    want = expected_histories(read, s, 5)
    got = sample_histories(s)
    for w, g in zip(want, got):
        assert g[0::2] == w and g[1::2] == w


def test_read_errors_say_what_the_file_is(tmp_path: Path) -> None:
    """A directory is named as one (not "no such file"); a Parquet file named .txt is read as
    the text it claims to be; a CSV with a header and no rows is an empty log, not a null column."""
    from model.data.log import write_log

    csv = tmp_path / "ok.csv"
    csv.write_text("user_id,item_id,cate_id,timestamp\n1,10,2,5\n2,11,3,6\n")
    log = read_log(csv)

    parquet = write_log(log, tmp_path / "log.parquet")
    disguised = tmp_path / "log.txt"
    disguised.write_bytes(parquet.read_bytes())
    with pytest.raises(LogFormatError, match="a directory, not a log file"):
        read_log(tmp_path)
    with pytest.raises(LogFormatError, match="cannot be read as CSV"):
        read_log(disguised)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("user_id,item_id,cate_id,timestamp\n")
    assert len(read_log(header_only)) == 0
