import zipfile

import numpy as np
import pytest

from conftest import shared
from feddmmr.config import PrepareParams
from feddmmr.federated.client import train_windows
from feddmmr.data.prepare import build_sequences, load_prepared, prepare, read_interactions
from feddmmr.evaluation.metrics import eval_inputs
from feddmmr.errors import FeddmmrError


def _ml1m_folder(tmp_path, lines):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return d


ROWS = [  # user::item::rating::ts ; user 7 has a same-second tie (items 30 then 10, file order)
    "7::30::5::100", "7::10::4::100", "7::20::3::50", "7::40::1::200", "7::50::2::300",
    "3::10::5::10", "3::20::5::20", "3::30::5::30", "3::40::5::40", "3::60::5::50",
    "9::10::5::1", "9::20::5::2", "9::30::5::3",
]


def test_ml1m_folder_and_zip_give_same_sequences(tmp_path):
    folder = _ml1m_folder(tmp_path, ROWS)
    z = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(folder / "ratings.dat", "ml-1m/ratings.dat")
    a, b = read_interactions("ml-1m", folder), read_interactions("ml-1m", z)
    assert a.equals(b) and len(a) == len(ROWS)


def test_time_order_ties_keep_file_order_and_topk_ties_keep_first_appearance(tmp_path):
    frame = read_interactions("ml-1m", _ml1m_folder(tmp_path, ROWS))
    items, offsets, user_raw, item_raw = build_sequences(frame, top_k_users=2, min_user_interactions=3)
    # users 7 and 3 both have 5 interactions; 7 appears first in the file, so it is user 0
    assert user_raw.tolist() == [7, 3]
    assert item_raw.tolist() == [10, 20, 30, 40, 50, 60]  # contiguous ids 1..6 by raw id
    raw = item_raw[items - 1]
    assert raw[offsets[0]:offsets[1]].tolist() == [20, 30, 10, 40, 50]  # ts 50, then the tie 100 in file order
    assert raw[offsets[1]:offsets[2]].tolist() == [10, 20, 30, 40, 60]


def test_leave_one_out_split_and_windows(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("user,item,timestamp\n" + "\n".join(f"1,{i},{i}" for i in range(1, 8)) + "\n")
    out = tmp_path / "prep"
    prepare(PrepareParams(source="csv", path=str(csv), max_seq_len=3, eval_negatives=0), out)
    data = load_prepared(out)
    x, target, hist = eval_inputs(data, "val")
    assert target.tolist() == [6] and x.tolist() == [[3, 4, 5]] and hist[0].tolist() == [1, 2, 3, 4, 5]
    x, target, _ = eval_inputs(data, "test")
    assert target.tolist() == [7] and x.tolist() == [[4, 5, 6]]
    wx, wy, wpos, owner = train_windows(data)  # train seq 1..5: inputs 1..4 -> targets 2..5, cut from the end
    assert wx.tolist() == [[2, 3, 4], [0, 0, 1]] and wy.tolist() == [[3, 4, 5], [0, 0, 2]]
    assert wpos.tolist() == [[2, 3, 4], [0, 0, 1]]  # index of each target in the user's sequence
    assert owner.tolist() == [0, 0]


def test_eval_negatives_fixed_distinct_and_outside_history(tiny_csv, tmp_path):
    p = PrepareParams(source="csv", path=str(tiny_csv), eval_negatives=20)
    prepare(p, tmp_path / "a")
    prepare(p, tmp_path / "b")
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    assert np.array_equal(a.eval_negatives, b.eval_negatives)
    for u in range(a.num_users):
        neg = a.eval_negatives[u]
        assert len(set(neg.tolist())) == 20 and neg.min() >= 1 and neg.max() <= a.num_items
        assert not set(neg.tolist()) & set(a.sequence(u).tolist())


def test_ml100k_and_csv_readers(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.data").write_text("1\t5\t3\t881250949\n2\t6\t4\t881250950\n")
    assert read_interactions("ml-100k", d)[["user", "item"]].values.tolist() == [[1, 5], [2, 6]]
    c = tmp_path / "mine.csv"
    c.write_text("userId;movieId;time\n1;5;10\n2;6;11\n")
    frame = read_interactions("csv", c)
    assert frame[["user", "item", "timestamp"]].values.tolist() == [[1, 5, 10], [2, 6, 11]]


@pytest.mark.parametrize("case, content, message", [
    ("missing", None, "not found"),
    ("wrong separator", "1,2,3,4\n", "not separated by"),
    ("empty", "", "empty"),
    ("non-numeric", "1::2::5::100\nabc::3::4::101\n", "user id 'abc' in data row 2 is not an integer"),
    ("fractional id", "1::2::5::100\n1::2.5::4::101\n", "item id '2.5' in data row 2 is not an integer"),
    ("beyond int64", "1::2::5::100\n9223372036854775808::3::4::101\n",
     "user id 9223372036854775808 in data row 2 does not fit a signed 64-bit integer"),
])
def test_bad_ml1m_input_fails_with_one_line_and_writes_nothing(tmp_path, case, content, message):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    if content is not None:
        (folder / "ratings.dat").write_text(content)
    out = tmp_path / "prepared"
    with pytest.raises(FeddmmrError, match=message) as err:
        prepare(PrepareParams(source="ml-1m", path=str(folder)), out)
    assert "ratings.dat" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [folder]  # no temporary leftovers


def test_ids_are_exact_integers_never_floats(tmp_path):
    """Ids near 2^53 beside a '5.0' used to go through float64 and merge (400 items became 202)."""
    big = 2 ** 53
    c = tmp_path / "ids.csv"
    rows = [f"{big + u},{big + i},{u * 10 + i}" for u in range(1, 4) for i in range(1, 7)] + ["1,5.0,1"]
    c.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    frame = read_interactions("csv", c)
    assert frame["item"].nunique() == 7 and frame["user"].nunique() == 4
    assert sorted(set(frame["item"].tolist())) == [5] + [big + i for i in range(1, 7)]
    prepare(PrepareParams(source="csv", path=str(c), eval_negatives=0, min_user_interactions=3), tmp_path / "p")
    data = load_prepared(tmp_path / "p")
    assert sorted(data.user_raw.tolist()) == [big + u for u in range(1, 4)]    # user_map.csv keeps them exact


def test_ids_beyond_int64_are_refused_not_merged(tmp_path):
    """1e20 + u used to merge every user into one (and 2^63 + k came back negative in user_map.csv)."""
    c = tmp_path / "ids.csv"
    c.write_text("user,item,timestamp\n" + "\n".join(f"{10 ** 20 + u},{i},{i}" for u in range(3) for i in range(5)))
    with pytest.raises(FeddmmrError, match=r"user id 100000000000000000000 in data row 1 does not fit"):
        read_interactions("csv", c)


def test_a_csv_line_with_extra_columns_is_one_line(tmp_path):
    c = tmp_path / "x.csv"
    c.write_text("user,item,timestamp\n1,2,3\n1,3,4,9,9\n")
    with pytest.raises(FeddmmrError, match=r"x.csv: .*Expected 3 fields in line 3, saw 5") as err:
        read_interactions("csv", c)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage, message", [
    ("corrupt npz", "sequences.npz could not be read"),
    ("no user map", "user_map.csv is missing"),
    ("short item map", "do not agree"),
])
def test_damaged_prepared_data_is_one_line(tiny_csv, tmp_path, damage, message):
    out = tmp_path / "prepared"
    prepare(PrepareParams(source="csv", path=str(tiny_csv), eval_negatives=5), out)
    if damage == "corrupt npz":
        (out / "sequences.npz").write_bytes((out / "sequences.npz").read_bytes()[:200])
    elif damage == "no user map":
        (out / "user_map.csv").unlink()
    else:
        lines = (out / "item_map.csv").read_text().splitlines()
        (out / "item_map.csv").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(FeddmmrError, match=message):
        load_prepared(out)


def test_a_second_prepare_into_the_same_output_is_refused_at_once(tmp_path, tiny_csv):
    """Two `feddmmr prepare --out x` used to race (OSError: Directory not empty)."""
    from feddmmr.io import exclusive
    out = tmp_path / "prepared"
    with exclusive(out):                     # another process holds it (flock is per open file: same effect)
        with pytest.raises(FeddmmrError, match="prepared is being written by pid"):
            prepare(PrepareParams(source="csv", path=str(tiny_csv), eval_negatives=5), out)
    assert not out.exists()


def test_failed_prepare_keeps_previous_output(tmp_path, tiny_csv):
    out = tmp_path / "prepared"
    prepare(PrepareParams(source="csv", path=str(tiny_csv), eval_negatives=20), out)
    before = (out / "sequences.npz").read_bytes()
    with pytest.raises(FeddmmrError):
        prepare(PrepareParams(source="csv", path=str(tmp_path / "nope.csv")), out)
    assert (out / "sequences.npz").read_bytes() == before


def test_empty_result_after_filtering(tmp_path):
    c = tmp_path / "few.csv"
    c.write_text("user,item,timestamp\n1,1,1\n1,2,2\n")
    with pytest.raises(FeddmmrError, match="no user has >= 5 interactions"):
        prepare(PrepareParams(source="csv", path=str(c)), tmp_path / "out")


@pytest.mark.realdata
def test_real_ml1m_top1000_subset(tmp_path):
    folder = shared("ml-1m/ratings.dat").parent
    meta = prepare(PrepareParams(source="ml-1m", path=str(folder), top_k_users=1000), tmp_path / "p")
    assert meta["num_users"] == 1000
    # the original subset has 515,329 interactions from the full 1,000,209 rows; ours lacks 137 rows
    assert 515_000 <= meta["num_interactions"] <= 515_329
    assert meta["sequence_length"]["min"] >= 290


@pytest.mark.realdata
def test_real_ml100k(tmp_path):
    folder = shared("ml-100k/u.data").parent
    meta = prepare(PrepareParams(source="ml-100k", path=str(folder)), tmp_path / "p")
    assert meta["num_users"] == 943 and meta["num_interactions"] == 100_000 and meta["num_items"] == 1682


def test_a_binary_or_sparse_input_is_refused_at_once(tmp_path):
    """A 2 GB sparse file was still being read after 300 s; now its first bytes refuse it."""
    import time
    big = tmp_path / "big.csv"
    with open(big, "wb") as f:
        f.truncate(2 << 30)                         # 2 GiB of holes, no disk used
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").symlink_to(big)
    start = time.perf_counter()
    for source, path in (("csv", big), ("ml-1m", folder)):
        with pytest.raises(FeddmmrError, match="is not a text file .NUL bytes at byte 0"):
            read_interactions(source, path)
    assert time.perf_counter() - start < 5
