"""Reader study: ICC against Shrout & Fleiss (1979), numbered montages, sheets round trip."""
import csv

import numpy as np
import pytest
from PIL import Image

from ZeroShotILDLib.errors import InputError
from zeroshot_ild_train.reader_study import (
    ReaderCount,
    count_table,
    export_reader_study,
    icc,
    icc3_1_ci,
    numbered_grid,
    patch_overlap_percent,
    read_reader_counts,
    reader_study_table,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SF_TABLE2 = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]


def test_icc_matches_shrout_fleiss_worked_example():
    r = icc(SF_TABLE2)
    # Published ANOVA (their Table 3) and ICCs (their Table 4), two decimals.
    assert (round(r.bms, 2), round(r.wms, 2), round(r.jms, 2), round(r.ems, 2)) == (
        11.24, 6.26, 32.49, 1.02)
    assert round(r.icc3_1, 2) == 0.71
    assert round(r.icc2_1, 2) == 0.29
    assert round(r.icc1_1, 2) == 0.17
    assert (round(r.icc1_k, 2), round(r.icc2_k, 2), round(r.icc3_k, 2)) == (0.44, 0.62, 0.91)
    assert (r.n_targets, r.n_raters) == (6, 4)


def test_icc_properties():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=40)
    # Readers who differ only by a constant offset agree perfectly on consistency (ICC 3,1)
    # but not on absolute agreement (ICC 2,1).
    offset = np.stack([truth, truth + 2.0, truth - 1.0], axis=1)
    r = icc(offset)
    assert abs(r.icc3_1 - 1.0) < 1e-12 and r.icc2_1 < 0.5
    noisy = icc(truth[:, None] + rng.normal(scale=1.0, size=(40, 3)))
    assert 0.3 < noisy.icc3_1 < 0.7  # true ICC is 1 / (1 + 1) = 0.5
    # The F-based 95 % interval covers the true ICC(3,1) = 0.5 about 95 % of the time.
    covered, width = 0, []
    for _ in range(300):
        x = rng.normal(size=(30, 1)) + rng.normal(size=(30, 3)) + [0.0, 0.5, -0.3]
        lo, hi = icc3_1_ci(x)
        covered += lo < 0.5 < hi
        width.append(hi - lo)
    assert 0.91 <= covered / 300 <= 0.99
    lo6, hi6 = icc3_1_ci(SF_TABLE2)
    assert lo6 < icc(SF_TABLE2).icc3_1 < hi6 and hi6 - lo6 > np.mean(width)
    assert np.isnan(icc([[3, 3], [3, 3]]).icc3_1)
    with pytest.raises(InputError, match="at least 2 scans rated by at least 2 readers"):
        icc([[1, 2, 3]])
    with pytest.raises(InputError, match="gaps"):
        icc([[1, 2], [3, float("nan")]])


def test_numbered_grid_draws_lines_and_numbers():
    montage = np.full((224, 224), 128, np.uint8)
    img = numbered_grid(montage, 4, min_cell_px=64)
    assert img.mode == "RGB" and img.size == (448, 448)  # 56 px cells doubled to 112
    a = np.asarray(img)
    yellow = (a[..., 0] > 200) & (a[..., 1] > 180) & (a[..., 2] < 60)
    assert yellow[:, 112].mean() > 0.9 and yellow[336, :].mean() > 0.9  # grid lines
    # Every cell carries a dark label box with yellow text near its top-left corner.
    for r in range(4):
        for c in range(4):
            corner = a[r * 112 + 4:r * 112 + 30, c * 112 + 4:c * 112 + 30]
            assert (corner.sum(-1) == 0).any() and (corner[..., 2] < 60).any()
    # The middle of each cell is the untouched montage.
    assert (a[56, 56] == 128).all() and (a[392, 392] == 128).all()
    # 16 x 16 montage: numbers up to 256 and legible cells.
    big = numbered_grid(np.zeros((224, 224)), 16)
    assert big.size[0] // 16 >= 64
    with pytest.raises(InputError):
        numbered_grid(np.zeros((4, 4, 4, 4)), 4)


def test_export_fill_import_and_table(tmp_path):
    rng = np.random.default_rng(1)
    montages = {(f"s{i}", m): rng.random((64, 64)) for i in range(5)
                for m in ("random", "clip")}
    out = export_reader_study(montages, tmp_path, grid_n=4, readers=["A", "B"])
    assert len(out["images"]) == 10 and all(p.is_file() for p in out["images"])
    assert Image.open(out["images"][0]).size == (64 * 4, 64 * 4)
    assert [p.name for p in out["sheets"]] == ["counts_A.csv", "counts_B.csv"]
    with out["sheets"][0].open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "scan_id", "method", "reader", "count"]
    assert len(rows) == 10 and all(r["count"] == "" and r["reader"] == "A" for r in rows)
    # Blank sheets are refused until filled in.
    with pytest.raises(InputError, match="column count: not filled in"):
        read_reader_counts(out["sheets"], grid_n=4)
    # Fill: reader B counts one more than A on CLIP montages.
    truth = {("s0", "random"): 2, ("s1", "random"): 5, ("s2", "random"): 1, ("s3", "random"): 7,
             ("s4", "random"): 3, ("s0", "clip"): 9, ("s1", "clip"): 12, ("s2", "clip"): 4,
             ("s3", "clip"): 8, ("s4", "clip"): 10}
    for sheet, extra in zip(out["sheets"], (0, 1)):
        with sheet.open() as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r["count"] = truth[(r["scan_id"], r["method"])] + (extra if r["method"] == "clip" else 0)
        with sheet.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    counts = read_reader_counts(out["sheets"], grid_n=4)
    assert len(counts) == 20
    table, scans, readers, dropped = count_table(counts, "clip")
    assert readers == ["A", "B"] and dropped == [] and table.shape == (5, 2)
    groups = {"s0": "Negative", "s1": "Positive", "s2": "Negative", "s3": "Positive", "s4": "Positive"}
    rows = reader_study_table(counts, grid_n=4, groups=groups, methods=["random", "clip"])
    pos_clip = next(r for r in rows if r["group"] == "Positive" and r["method"] == "clip")
    assert pos_clip["n_scans"] == 3 and pos_clip["n_readers"] == 2
    assert pos_clip["mean_count"] == pytest.approx((12 + 8 + 10 + 13 + 9 + 11) / 6)
    assert pos_clip["percent_ild"] == pytest.approx(100 * pos_clip["mean_count"] / 16)
    assert pos_clip["icc3_1"] == pytest.approx(1.0)  # constant offset: perfect consistency
    neg_random = next(r for r in rows if r["group"] == "Negative" and r["method"] == "random")
    assert neg_random["n_scans"] == 2 and neg_random["icc3_1"] == pytest.approx(1.0)
    assert [r["group"] for r in rows] == ["Negative", "Negative", "Positive", "Positive"]


def test_blinded_export_uses_key(tmp_path):
    montages = {(f"s{i}", m): np.zeros((32, 32), np.uint8) for i in range(3) for m in ("a", "b")}
    out = export_reader_study(montages, tmp_path, grid_n=2, readers=["R1"], blind=True, seed=4)
    names = sorted(p.name for p in out["images"])
    assert names == [f"case_{i:03d}.png" for i in range(1, 7)]
    with out["sheets"][0].open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert all(r["scan_id"] == "" and r["method"] == "" for r in rows)
    for r in rows:
        r["count"] = "1"
    with out["sheets"][0].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(InputError, match="pass the study's key.csv"):
        read_reader_counts(out["sheets"], grid_n=2)
    counts = read_reader_counts(out["sheets"], grid_n=2, key_path=out["key"])
    assert {(c.scan_id, c.method) for c in counts} == set(montages)


@pytest.mark.parametrize("body, match", [
    ("scan_id,method,reader,count\ns1,clip,A,17\n", r"line 2, column count: '17' must be a whole number from 0 to 16"),
    ("scan_id,method,reader,count\ns1,clip,A,2.5\n", r"must be a whole number"),
    ("scan_id,method,reader,count\ns1,clip,A,many\n", r"'many' is not a number"),
    ("scan_id,method,reader,count\ns1,clip,,3\n", r"column reader: empty"),
    ("scan_id,method,reader,count\ns1,clip,A,3\ns1,clip,A,4\n", r"line 3: A already counted s1 / clip at s\.csv line 2"),
    ("scan_id,method,count\ns1,clip,3\n", r"has no reader column"),
])
def test_sheet_errors(tmp_path, body, match):
    p = tmp_path / "s.csv"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(InputError, match=match) as e:
        read_reader_counts([p], grid_n=4)
    assert "\n" not in str(e.value)


def test_incomplete_scans_are_dropped_from_icc_but_counted_in_mean():
    counts = [ReaderCount("s1", "m", "A", 4), ReaderCount("s1", "m", "B", 5),
              ReaderCount("s2", "m", "A", 8), ReaderCount("s2", "m", "B", 9),
              ReaderCount("s3", "m", "A", 1), ReaderCount("s4", "m", "A", 2),
              ReaderCount("s4", "m", "B", 2)]
    table, scans, readers, dropped = count_table(counts, "m")
    assert scans == ["s1", "s2", "s4"] and dropped == ["s3"]
    row = reader_study_table(counts, grid_n=4)[0]
    assert row["dropped_scans"] == 1 and row["n_scans"] == 4
    assert row["mean_count"] == pytest.approx(31 / 7)


def test_patch_overlap_percent():
    assert patch_overlap_percent([[1, 1, 0, 0], [1, 0, 0, 0]]) == pytest.approx(37.5)
    with pytest.raises(InputError):
        patch_overlap_percent([])
