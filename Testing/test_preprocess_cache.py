"""The preprocess montage cache: keyed on content, robust to damaged items and hostile images."""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zeroshot_ild_train import cli, preprocess
from zeroshot_ild_train.manifest import read_manifest
from ZeroShotILDLib import file_hashes
from ZeroShotILDLib.settings import AnalysisSettings

ARGS = ["--retrieval", "random", "--model", "tiny-random", "--device", "cpu", "--patch-mm", "32",
        "--montage-size", "4", "-q"]


@pytest.fixture(autouse=True)
def private_hash_memo(tmp_path, monkeypatch):
    monkeypatch.setenv(file_hashes.MEMO_ENV, str(tmp_path / "hash-memo.json"))
    file_hashes.forget()


def figure(path: Path, seed: int) -> Path:
    """A 2-D grey image (a figure crop, as in COVID-CT) whose content depends on ``seed``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(path)
    return path


def bomb(path: Path, side: int = 30000) -> Path:
    """A tiny PNG whose header declares side x side pixels (PIL's DecompressionBombError)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def manifest(folder: Path, rows: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["scan_id,scan_path,report_text"] + [f"{sid},{path},FINDINGS: clear." for sid, path in rows]
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def montages_for(man: Path, cache: Path) -> dict:
    settings = cli._cache_settings(str(cache))
    found = preprocess.finished_montages(read_manifest(man), cache, settings)
    return {k: Path(v).read_bytes() for k, v in found.items()}


def test_a_decompression_bomb_is_one_failed_item(tmp_path, capsys):
    folder = tmp_path / "cohort"
    folder.mkdir()
    figure(folder / "good.png", 1)
    bomb(folder / "huge.png")
    man = manifest(folder, [("good", "good.png"), ("huge", "huge.png")])
    code, out, err = run(capsys, "preprocess", man, "--cache", tmp_path / "cache", *ARGS)
    assert code == 3 and "1 montages written, 0 already finished, 1 failed" in out
    assert "Traceback" not in err and err.count("\n") == 1
    assert "huge.png declares more pixels" in err
    # Just above our own limit but below PIL's: refused by the header's size as well.
    bomb(folder / "huge.png", side=8000)
    code, out, err = run(capsys, "preprocess", man, "--cache", tmp_path / "cache", *ARGS)
    assert code == 3 and "8000 x 8000 pixels" in err and err.count("\n") == 1


def test_two_cohorts_sharing_a_cache_never_swap_montages(tmp_path, capsys):
    """Same scan_id, same relative scan_path, different patients: each gets its own montage."""
    cache = tmp_path / "cache"
    a, b = tmp_path / "siteA", tmp_path / "siteB"
    a.mkdir()
    b.mkdir()
    figure(a / "scan.png", 1)
    figure(b / "scan.png", 2)
    man_a = manifest(a, [("case001", "scan.png")])
    man_b = manifest(b, [("case001", "scan.png")])
    assert run(capsys, "preprocess", man_a, "--cache", cache, *ARGS)[0] == 0
    code, out, _ = run(capsys, "preprocess", man_b, "--cache", cache, *ARGS)
    assert code == 0 and "1 montages written, 0 already finished" in out
    mont_a, mont_b = montages_for(man_a, cache)["case001"], montages_for(man_b, cache)["case001"]
    assert mont_a != mont_b
    # A scan_id pointed at a new file (same name, new content, mtime restored) is redone too.
    stat = (a / "scan.png").stat()
    figure(a / "scan.png", 3)
    import os

    os.utime(a / "scan.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, out, _ = run(capsys, "preprocess", man_a, "--cache", cache, *ARGS)
    assert code == 0 and "1 montages written" in out
    assert montages_for(man_a, cache)["case001"] not in (mont_a, mont_b)


def test_content_key_covers_dicom_style_folders(tmp_path):
    settings = AnalysisSettings(model="tiny-random", retrieval="random")
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(bytes([i]) * 100)
    before = preprocess.item_key("s", settings, series)
    assert preprocess.item_key("s", settings, series) == before
    (series / "1.dcm").write_bytes(b"\x09" * 100)  # one slice replaced
    assert preprocess.item_key("s", settings, series) != before


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar"])
def test_a_damaged_cached_montage_is_warned_and_redone(tmp_path, capsys, caplog, damage):
    folder = tmp_path / "cohort"
    folder.mkdir()
    figure(folder / "a.png", 1)
    man = manifest(folder, [("a", "a.png")])
    cache = tmp_path / "cache"
    assert run(capsys, "preprocess", man, "--cache", cache, *ARGS)[0] == 0
    (png,) = (cache / "montages").glob("*.png")
    good = png.read_bytes()
    if damage == "truncate":
        png.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01
        png.write_bytes(bytes(data))
    else:
        png.with_suffix(".json").write_bytes(b'{"scan_id": "a", "png_sha')
    with caplog.at_level(logging.WARNING):
        code, out, _ = run(capsys, "preprocess", man, "--cache", cache, *ARGS)
    assert code == 0 and "1 montages written, 0 already finished" in out
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert png.read_bytes() == good
