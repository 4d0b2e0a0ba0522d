"""``zeroshot-ild analyze --shard i/N`` over a cohort and ``zeroshot-ild merge-shards`` (issue 24).

Shards of a job array must cover every scan once and merge into the very summary one unsharded
run writes; a missing shard is one line, never a partial summary.
"""
from pathlib import Path

import pytest

from ZeroShotILDLib.cli import main
from ZeroShotILDLib.shards import parse_shard, shard_indices

FAST = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "40", "--slice-step-mm", "12", "-q"]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    from ZeroShotILDLib.phantom import write_cohort

    folder = tmp_path_factory.mktemp("shards")
    write_cohort(folder, 4, seed=11, shape_zyx=(32, 96, 96), spacing_mm=(3.0, 3.0, 6.0))
    paths = sorted(folder.glob("**/*.nii.gz"))
    assert len(paths) >= 4
    broken = folder / "broken.nii.gz"
    broken.write_bytes(b"not a scan")  # a failed scan's row must survive the merge too
    return [paths[2], broken, paths[0], paths[3], paths[1]]


def test_every_scan_is_in_exactly_one_shard():
    inputs = [f"/data/s{i:02d}.nii.gz" for i in range(11)][::-1]
    parts = [shard_indices(inputs, i, 4) for i in range(4)]
    assert sorted(k for p in parts for k in p) == list(range(11))
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_shards_merge_to_the_summary_of_one_run(scans, tmp_path, capsys):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    code, _, err = _run(["analyze", *scans, "--out", one, *FAST], capsys)
    assert code == 3, err  # the broken scan fails, the others are analysed
    for i in range(3):
        code, _, err = _run(["analyze", *scans, "--out", sharded, "--shard", f"{i}/3", *FAST], capsys)
        assert code in (0, 3), err
    assert not (sharded / "summary.csv").exists()
    (sharded / "summary.shard-1-of-3.json").rename(tmp_path / "held_back.json")
    code, _, err = _run(["merge-shards", sharded], capsys)
    assert code == 2 and "shard(s) 1 of 3 missing" in err and not (sharded / "summary.csv").exists()
    (tmp_path / "held_back.json").rename(sharded / "summary.shard-1-of-3.json")
    code, stdout, err = _run(["merge-shards", sharded], capsys)
    assert code == 3 and "5 scans (1 failed)" in stdout, err
    assert (sharded / "summary.csv").read_bytes() == (one / "summary.csv").read_bytes()
    # Every scan's folder is where the unsharded run put it.
    assert sorted(p.name for p in one.iterdir() if p.is_dir()) == sorted(p.name for p in sharded.iterdir() if p.is_dir())
