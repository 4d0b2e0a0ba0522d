#!/usr/bin/env python
"""Issue 25's hostile cases, each built here from scratch and checked; prints a pass/fail table.

    .venv/bin/python scripts/attack_check.py            # every case
    .venv/bin/python scripts/attack_check.py -k worker  # cases whose id contains "worker"

Exit code 0 when every case passes, 1 otherwise. ``Testing/test_attack_round3.py`` runs the same
cases under pytest. A case that needs the real scans in ``../shared/data`` (the padded real crop)
is reported as "skip" without them. Covered: output folders (links at staging names, look-alike
leftovers, forged manifests), training ``--out``, the Slicer worker's files, ``--lung-mask`` label
maps, hash memos, padded and tilted crops, ``--config`` files, ``--seed``, caches (file,
read-only, FIFO), the manifest split's linearity and formula cells in every CSV. Not covered here:
the DICOM string rules (issue 21).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "ZeroShotILD")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

SHARED_CT = REPO.parent / "shared" / "data" / "real" / "ct" / "totalseg"
TINY = dict(model="tiny-random", device="cpu", patch_mm=30.0, slice_step_mm=5.0, batch_size=32)
CASES: list = []


class Skip(Exception):
    """The case cannot run here (its data is absent); not a failure."""


def case(group: str, what: str):
    def register(fn):
        CASES.append((fn.__name__.replace("case_", ""), group, what, fn))
        return fn
    return register


# ----------------------------------------------------------------------------------------------
# Shared inputs (built once per process)
# ----------------------------------------------------------------------------------------------
_cache: dict = {}


def phantom():
    if "phantom" not in _cache:
        from ZeroShotILDLib.phantom import generate_phantom

        _cache["phantom"] = generate_phantom(3, shape_zyx=(48, 128, 128), spacing_mm=(2.5, 2.5, 5.0))
    return _cache["phantom"]


def phantom_scan():
    from ZeroShotILDLib.scan import scan_from_array

    p = phantom()
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source="phantom")


def small_result():
    if "result" not in _cache:
        from ZeroShotILDLib.pipeline import analyze
        from ZeroShotILDLib.settings import AnalysisSettings

        scan = phantom_scan()
        _cache["scan"] = scan
        _cache["result"] = analyze(scan, AnalysisSettings(**TINY).validate())
    return _cache["result"], _cache["scan"]


def phantom_file(work: Path) -> Path:
    path = work / "chest.nii.gz"
    if not path.exists():
        phantom().save(path)
    return path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(main, argv) -> tuple:
    """(exit code, stderr) of an in-process CLI run; argparse's SystemExit counts as its code."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def one_line(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------
# Data loss: zeroshot-ild --out
# ----------------------------------------------------------------------------------------------
@case("data loss", "link planted at a staging name inside --out is never followed")
def case_staging_symlink(work: Path):
    from ZeroShotILDLib import outputs

    result, scan = small_result()
    victim = work / "victim"
    victim.mkdir()
    for i in range(10):
        (victim / f"file{i}.txt").write_text(str(i), encoding="utf-8")
    # Also names the tool writes: a followed link would replace or remove them.
    (victim / "result.json").write_text("{}", encoding="utf-8")
    before = snapshot(victim)
    out = work / "out"
    out.mkdir()
    for pid in (os.getpid(), dead_pid(), 1):
        os.symlink(victim, out / f"{outputs.STAGING_PREFIX}{pid}")
    outputs.write_outputs(result, scan, out, overwrite=True)
    outputs.write_outputs(result, scan, out, overwrite=True)
    assert snapshot(victim) == before, "the folder behind the planted link changed"


@case("data loss", "a user's .R.old-999999 beside --out R keeps its files")
def case_lookalike_beside_out(work: Path):
    from ZeroShotILDLib import outputs

    result, scan = small_result()
    mine = work / ".R.old-999999"
    mine.mkdir()
    (mine / "result.json").write_text("mine", encoding="utf-8")
    (mine / "montage.png").write_bytes(b"mine")
    partial = work / ".R.partial-abc123"
    partial.mkdir()
    (partial / "report.html").write_text("mine", encoding="utf-8")
    before = snapshot(work)
    outputs.write_outputs(result, scan, work / "R")
    after = {k: v for k, v in snapshot(work).items() if not k.startswith("R/")}
    assert after == before, "a folder beside --out was changed"


@case("data loss", "a user's hidden .report.html.mine.partial inside --out is kept")
def case_hidden_partial_inside_out(work: Path):
    from ZeroShotILDLib import outputs

    result, scan = small_result()
    out = outputs.write_outputs(result, scan, work / "R")
    (out / ".report.html.mine.partial").write_text("my draft", encoding="utf-8")
    os.utime(out / ".report.html.mine.partial", (1, 1))  # looks old: a pattern-based cleaner took it
    outputs.write_outputs(result, scan, out, overwrite=True)
    assert (out / ".report.html.mine.partial").read_text(encoding="utf-8") == "my draft"


@case("data loss", "a forged 60-byte manifest naming thesis.tex: refused, thesis.tex kept (also --overwrite)")
def case_forged_manifest(work: Path):
    from ZeroShotILDLib import outputs
    from ZeroShotILDLib.errors import InputError

    result, scan = small_result()
    for overwrite in (False, True):
        out = work / f"thesis-{overwrite}"
        out.mkdir()
        (out / "thesis.tex").write_text("chapter 1", encoding="utf-8")
        (out / "result.json").write_text("{}", encoding="utf-8")
        for fmt in ("zeroshot-ild-manifest/1", outputs.MANIFEST_FORMAT):
            files = ["thesis.tex"] if fmt.endswith("/1") else {"thesis.tex": {"size": 9, "sha256": "0" * 64}}
            (out / outputs.MANIFEST_NAME).write_text(json.dumps({"format": fmt, "files": files}), encoding="utf-8")
            try:
                outputs.write_outputs(result, scan, out, overwrite=overwrite)
                assert overwrite, "a folder with a forged manifest was taken as an earlier result"
            except InputError as exc:
                assert not overwrite and "\n" not in str(exc)
            assert (out / "thesis.tex").read_text(encoding="utf-8") == "chapter 1", "thesis.tex was lost"


@case("data loss", "an earlier result whose files changed is refused as foreign")
def case_changed_result_is_foreign(work: Path):
    from ZeroShotILDLib import outputs
    from ZeroShotILDLib.errors import InputError

    result, scan = small_result()
    out = outputs.write_outputs(result, scan, work / "R")
    outputs.write_outputs(result, scan, out)  # unchanged: recognised, replaced
    (out / "report.html").write_text("edited by hand", encoding="utf-8")
    try:
        outputs.write_outputs(result, scan, out)
        raise AssertionError("a result with an edited report.html was replaced")
    except InputError as exc:
        assert "report.html" in str(exc)
    assert (out / "report.html").read_text(encoding="utf-8") == "edited by hand"


# ----------------------------------------------------------------------------------------------
# Data loss: zeroshot-ild-train --out
# ----------------------------------------------------------------------------------------------
@case("data loss", "training staging look-alike .E8.partial-999999/ beside --out keeps sub/my.txt")
def case_training_lookalike(work: Path):
    from training.cli import _staged_output, _write_rows

    mine = work / ".E8.partial-999999"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "my.txt").write_text("mine", encoding="utf-8")
    with _staged_output(work / "E8") as tmp:
        assert tmp.parent == (work / "E8").resolve(), "staging is not inside --out"
        _write_rows(tmp / "scores.csv", [{"scan_id": "a", "score": 0.5}])
    assert (mine / "sub" / "my.txt").read_text(encoding="utf-8") == "mine"
    assert (work / "E8" / "scores.csv").is_file()


@case("data loss", "train/sweep/evaluate/grid/probe/reader-study/export refuse a foreign non-empty --out")
def case_training_foreign_out(work: Path):
    from training.cli import main

    foreign = work / "mine"
    foreign.mkdir()
    for name in ("best.safetensors", "metrics.csv", "results.md", "scores.csv"):
        (foreign / name).write_text(f"the user's {name}", encoding="utf-8")
    before = snapshot(foreign)
    m, c = work / "missing.csv", work / "cache"
    commands = {"train": ["train", m, "--cache", c, "--out", foreign],
                "sweep": ["sweep", m, "--cache", c, "--out", foreign],
                "evaluate": ["evaluate", m, "--out", foreign],
                "grid": ["grid", m, "--out", foreign],
                "probe": ["probe", m, "--cache", c, "--out", foreign],
                "reader-study export": ["reader-study", "export", m, "--out", foreign],
                "reader-study analyze": ["reader-study", "analyze", work, m, "--out", foreign],
                "export": ["export", m, "--out", foreign / "best.safetensors"]}
    for name, argv in commands.items():
        code, err = run_cli(main, argv)
        assert code == 2 and one_line(err), f"{name}: exit {code}, {err!r}"
        assert "not a folder zeroshot-ild-train wrote" in err or "not an engine checkpoint" in err, f"{name}: {err!r}"
        assert snapshot(foreign) == before, f"{name} changed the user's files"


# ----------------------------------------------------------------------------------------------
# Data loss: the Slicer worker
# ----------------------------------------------------------------------------------------------
def _worker_requests(session: Path, requests: list) -> list:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "ZeroShotILD"), str(REPO)]),
               ZEROSHOT_ILD_WORKER_SESSION=str(session))
    proc = subprocess.Popen([sys.executable, "-m", "ZeroShotILDMRML.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        payload = "".join(json.dumps(r) + "\n" for r in requests) + json.dumps({"op": "shutdown"}) + "\n"
        out, _ = proc.communicate(payload.encode("utf-8"), timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return [json.loads(line) for line in out.decode("utf-8").splitlines() if line.strip()]


@case("data loss", "worker: volumes outside its session folder are neither read nor deleted; out only inside")
def case_worker_owns_its_files(work: Path):
    from ZeroShotILDLib.settings import AnalysisSettings

    session = work / "session"
    session.mkdir(mode=0o700)
    backup = work / "my_ct_backup.npy"
    np.save(backup, np.zeros((2, 2, 2), dtype=np.int16))
    thesis = work / "thesis.tex"
    thesis.write_text("chapter 1", encoding="utf-8")
    project = work / "project"
    project.mkdir()
    (project / "result.json").write_text("the project's", encoding="utf-8")
    inside = session / "job-3"
    inside.mkdir()
    np.save(inside / "volume.npy", phantom().hu)
    link = session / "link.npy"
    os.symlink(backup, link)
    base = {"op": "analyse", "spacing_mm": [2.5, 2.5, 5.0], "origin_mm": [0, 0, 0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "source": "x",
            "settings": AnalysisSettings(**TINY).to_dict()}
    requests = [dict(base, id=1, volume=str(backup), out=str(session / "r1")),
                dict(base, id=2, volume=str(thesis), out=str(session / "r2")),
                dict(base, id=3, volume=str(inside / "volume.npy"), out=str(project)),
                dict(base, id=4, volume=str(link), out=str(session / "r4")),
                dict(base, id=5, volume=str(session / ".." / backup.name), out=str(session / "r5"))]
    events = {e.get("id"): e for e in _worker_requests(session, requests) if e.get("event") == "error"}
    for i in range(1, 6):
        assert i in events and events[i]["kind"] == "input", f"request {i}: {events.get(i)}"
    assert backup.is_file() and thesis.read_text(encoding="utf-8") == "chapter 1"
    assert (project / "result.json").read_text(encoding="utf-8") == "the project's"
    assert (inside / "volume.npy").is_file(), "refused request still deleted its volume"


# ----------------------------------------------------------------------------------------------
# Wrong answers without a word
# ----------------------------------------------------------------------------------------------
def _label_file(work: Path, labels: np.ndarray, name: str) -> Path:
    import SimpleITK as sitk

    p = phantom()
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(p.spacing_mm)
    image.SetOrigin(p.origin_mm)
    image.SetDirection(p.direction)
    path = work / name
    sitk.WriteImage(image, str(path))
    return path


@case("wrong answer", "--lung-mask label map (body + lungs, lobes): refused naming the values unless --lung-labels")
def case_lung_mask_labels(work: Path):
    from ZeroShotILDLib.cli import read_lung_mask
    from ZeroShotILDLib.errors import InputError

    p, scan = phantom(), phantom_scan()
    body_and_lungs = np.where(p.lung_mask, 2, np.where(p.body_mask, 1, 0))
    path = _label_file(work, body_and_lungs, "body_lungs.nii.gz")
    try:
        read_lung_mask(path, scan)
        raise AssertionError("a body + lungs label map was taken as lung")
    except InputError as exc:
        assert "1, 2" in str(exc) and "--lung-labels" in str(exc), str(exc)
    mask = read_lung_mask(path, scan, lung_labels=(2,))
    assert np.array_equal(mask, p.lung_mask), "--lung-labels 2 did not give the lungs"
    left = np.zeros(p.lung_mask.shape, dtype=bool)
    left[..., : p.lung_mask.shape[2] // 2] = True
    lobes = np.where(p.lung_mask & left, 10, np.where(p.lung_mask, 12, 0))  # TotalSegmentator lobe labels
    assert np.array_equal(read_lung_mask(_label_file(work, lobes, "lobes.nii.gz"), scan), p.lung_mask)


@case("wrong answer", "a hash-memo entry giving one file another's digest is not trusted")
def case_memo_forged_digest(work: Path):
    from ZeroShotILDLib import file_hashes

    memo = work / "memo.json"
    old = os.environ.get(file_hashes.MEMO_ENV)
    os.environ[file_hashes.MEMO_ENV] = str(memo)
    try:
        file_hashes.forget()
        a, b = work / "model_a.bin", work / "model_b.bin"
        a.write_bytes(os.urandom(3 << 20))
        b.write_bytes(os.urandom(3 << 20))
        digest_a, digest_b = file_hashes.sha256_file(a), file_hashes.sha256_file(b)
        file_hashes.flush()
        doc = json.loads(memo.read_text(encoding="utf-8"))
        key_b = str(b.resolve())
        doc["files"][key_b][1] = digest_a  # the attack: b's entry names a's digest
        memo.write_text(json.dumps(doc), encoding="utf-8")
        file_hashes.forget()
        assert file_hashes.sha256_file(b) == digest_b, "the forged digest was trusted"
        # Forged digest AND the probe of the other file: the probe is b's own ends, so still caught.
        doc["files"][key_b][2] = doc["files"][str(a.resolve())][2]
        memo.write_text(json.dumps(doc), encoding="utf-8")
        file_hashes.forget()
        assert file_hashes.sha256_file(b) == digest_b
    finally:
        file_hashes.forget()
        if old is None:
            os.environ.pop(file_hashes.MEMO_ENV, None)
        else:
            os.environ[file_hashes.MEMO_ENV] = old


# ----------------------------------------------------------------------------------------------
# Valid scans refused: padding and tilt
# ----------------------------------------------------------------------------------------------
def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def padded_and_tilted_dice(hu: np.ndarray, spacing_mm, pad_value: int = -1000, pad: int = 24,
                           tilt_deg: float = 20.0) -> tuple:
    """(Dice padded vs unpadded, Dice tilt-sheared vs unpadded) of ``segment_lungs``."""
    from ZeroShotILDLib.lung_mask import segment_lungs

    base = segment_lungs(hu, spacing_mm)
    padded = np.pad(hu, ((0, 0), (pad, pad), (pad, pad)), constant_values=pad_value)
    d_pad = _dice(base, segment_lungs(padded, spacing_mm)[:, pad:-pad, pad:-pad])
    nz, ny, nx = hu.shape
    shift = np.tan(np.radians(tilt_deg)) * spacing_mm[2] / spacing_mm[1]
    offsets = [int(round(shift * z)) for z in range(nz)]
    tilted = np.full((nz, ny + offsets[-1], nx), pad_value, dtype=hu.dtype)
    for z, o in enumerate(offsets):
        tilted[z, o:o + ny] = hu[z]
    mask = segment_lungs(tilted, spacing_mm)
    back = np.stack([mask[z, o:o + ny] for z, o in enumerate(offsets)])
    return d_pad, _dice(base, back)


@case("valid scan refused", "synthetic crop through the lungs, padded with air / sheared 20 deg: Dice >= 0.98")
def case_padding_synthetic(work: Path):
    p = phantom()
    crop = np.ascontiguousarray(p.hu[5:40, 30:90, 15:113])  # cuts both lungs at every side
    for value in (-1000, -1024, -3024):
        d_pad, d_tilt = padded_and_tilted_dice(crop, p.spacing_mm, pad_value=value)
        assert d_pad >= 0.98 and d_tilt >= 0.98, f"padding {value}: Dice {d_pad:.3f} / {d_tilt:.3f}"


@case("valid scan refused", "real chest CT crop padded with air / 20 deg gantry-tilt crop: Dice >= 0.98")
def case_padding_real(work: Path):
    from ZeroShotILDLib.scan import read_scan

    path = SHARED_CT / "chest_crop_a.nii.gz"
    if not path.is_file():
        raise Skip(f"{path} is absent")
    scan = read_scan(path)
    d_pad, d_tilt = padded_and_tilted_dice(scan.hu, scan.spacing_mm)
    assert d_pad >= 0.98 and d_tilt >= 0.98, f"Dice padded {d_pad:.4f}, tilted {d_tilt:.4f}"


# ----------------------------------------------------------------------------------------------
# Tracebacks and hangs
# ----------------------------------------------------------------------------------------------
@case("traceback", "--config with wrong types, deep nesting, Latin-1 bytes, a huge file: one line each")
def case_config_files(work: Path):
    from training.cli import main

    bad = {"list_for_number.yaml": "seed: [1, 2]\n", "mapping_for_text.yaml": "model: {a: 1}\n",
           "text_for_number.yaml": "seed: twelve\n", "bool_for_number.yaml": "seed: true\n",
           "mapping_for_flag.yaml": "quiet: {x: 1}\n", "wrong_choice.yaml": "device: quantum\n",
           "deep.yaml": "seed: " + "[" * 3000 + "]" * 3000 + "\n",
           "deep_block.yaml": "".join("  " * i + f"k{i}:\n" for i in range(400)),
           "list_in_list.yaml": "prompt: [[a, b]]\n", "not_a_mapping.yaml": "- a\n- b\n",
           "broken.yaml": "seed: [1, 2\n", "python_tag.yaml": "seed: !!python/object/apply:os.system [echo]\n"}
    files = {name: text.encode("utf-8") for name, text in bad.items()}
    files["latin1.yaml"] = "prompt: fibrose pulmonaire \u00e9tendue\n".encode("latin-1")
    files["huge.yaml"] = b"prompt: " + b"x" * (2 << 20) + b"\n"
    for name, data in files.items():
        path = work / name
        path.write_bytes(data)
        code, err = run_cli(main, ["evaluate", work / "m.csv", "--out", work / "o", "--config", path])
        assert code == 2 and one_line(err), f"{name}: exit {code}: {err[:300]!r}"
    assert not (work / "o").exists()


@case("traceback", "--seed of the wrong type: one line, not the usage block")
def case_seed_wrong_type(work: Path):
    from training.cli import main as train_main

    from ZeroShotILDLib.cli import main

    for m, argv in ((main, ["analyze", "x.nii.gz", "-o", work / "o", "--seed", "abc"]),
                    (train_main, ["evaluate", "m.csv", "--out", work / "o", "--seed", "1.5"])):
        code, err = run_cli(m, argv)
        assert code == 2 and one_line(err) and "--seed" in err, repr(err)


@case("hang", "a FIFO at the hash-memo path does not block the run (one warning)")
def case_memo_fifo(work: Path):
    fifo = work / "memo.json"
    os.mkfifo(fifo)
    target = work / "weights.bin"
    target.write_bytes(b"w" * 1000)
    code = ("import sys; from ZeroShotILDLib.file_hashes import sha256_file, flush; "
            "print(sha256_file(sys.argv[1])); flush()")
    env = dict(os.environ, ZEROSHOT_ILD_HASH_MEMO=str(fifo), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, timeout=60,
                          text=True)
    assert done.returncode == 0, done.stderr[-300:]
    assert done.stderr.count("not a regular file") == 1, done.stderr


@case("hang", "FIFOs at embedding-cache and montage-cache entry paths are ignored (not read, not replaced)")
def case_cache_fifo(work: Path):
    from ZeroShotILDLib.embeddings import EmbeddingCache

    folder = work / "emb"
    folder.mkdir()
    os.mkfifo(folder / "k1.npz")
    cache = EmbeddingCache(folder)
    assert cache.get("k1") is None
    cache.put("k1", {"a": np.zeros(2)})
    assert (folder / "k1.npz").is_fifo(), "the FIFO was replaced"
    from training.manifest import ManifestRecord
    from training.preprocess import montage_path, preprocess

    from ZeroShotILDLib.settings import AnalysisSettings

    settings = AnalysisSettings(**TINY)
    record = ManifestRecord(scan_path=phantom_file(work), scan_id="a")
    png = montage_path(work / "montages", "a", settings, record.scan_path, None)
    png.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(png)
    summary = preprocess([record], work / "montages", settings)
    assert png.is_fifo() and summary.failed and "FIFO" in summary.failed[0][1], summary.line()


@case("traceback", "--cache-dir / --cache that is a file or cannot be written: one line, before any work")
def case_cache_unusable(work: Path):
    from training.cli import main as train_main

    from ZeroShotILDLib.cli import main

    scan = phantom_file(work)
    afile = work / "afile"
    afile.write_text("x", encoding="utf-8")
    places = [afile]
    if Path("/proc/self").is_dir():
        places.append(Path("/proc/self"))  # a folder nobody, not even root, can create files in
    manifest = work / "m.csv"
    manifest.write_text(f"scan_path,scan_id,ild\n{scan},a,1\n", encoding="utf-8")
    for place in places:
        out = work / f"out-{place.name}"
        code, err = run_cli(main, ["analyze", scan, "-o", out, "--cache-dir", place, "--model", "tiny-random",
                                   "--device", "cpu", "-q"])
        assert code == 2 and one_line(err) and "--cache-dir" in err, repr(err)
        assert not out.exists(), "analysis ran although the cache was unusable"
        code, err = run_cli(train_main, ["preprocess", manifest, "--cache", place, "-q"])
        assert code == 2 and one_line(err) and "--cache" in err, repr(err)


@case("slow", "manifest split is linear: 100k rows, constant passes over the rows")
def case_split_linear(work: Path):
    from training.manifest import ManifestRecord, split_by_patient, write_manifest

    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    records = Counted(ManifestRecord(scan_path=Path(f"/d/s{i}.nii.gz"), scan_id=f"s{i}", ild=i % 2,
                                     patient_id=f"p{i // 2}") for i in range(100_000))
    split = Counted(split_by_patient(records, val_fraction=0.1, test_fraction=0.1, seed=0, stratify="ild"))
    Counted.passes = 0
    write_manifest(split, work / "split.csv")
    assert Counted.passes <= 8, f"{Counted.passes} passes over 100k rows while writing"
    assert sum(1 for _ in open(work / "split.csv", encoding="utf-8")) == 100_001


# ----------------------------------------------------------------------------------------------
# Text that lands in other programs: CSV formula cells
# ----------------------------------------------------------------------------------------------
FORMULAS = ['=HYPERLINK("evil.example","x").nii.gz', "+1+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def _cells(path: Path) -> list:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return [c for row in csv.reader(handle) for c in row]


def _no_formula(cells) -> bool:
    from ZeroShotILDLib.csv_files import FORMULA_START, _NUMBER

    return not any(c.startswith(FORMULA_START) and not _NUMBER.match(c) for c in cells)


@case("csv", "summary.csv, patches.csv, scores.csv, failures.csv, manifests: no cell a spreadsheet runs")
def case_csv_formulas(work: Path):
    from training.cli import _write_rows
    from training.manifest import ManifestRecord, read_manifest, write_manifest

    from ZeroShotILDLib import outputs

    result, scan = small_result()
    rows = [dict(outputs.summary_row(result, name, name), error=name) for name in FORMULAS]
    outputs.write_summary(rows, work / "summary.csv")
    _write_rows(work / "scores.csv", [{"scan_id": n, "score": -0.25} for n in FORMULAS])
    _write_rows(work / "failures.csv", [{"scan_id": n, "split": "test", "reason": n} for n in FORMULAS])
    ids = FORMULAS[:4] + ["=cmd|' /C calc'!A0"]  # the reader strips blanks: no tab/CR-led ids here
    records = [ManifestRecord(scan_path=Path(f"/d/{i}.nii.gz"), scan_id=n, report_text=n, patient_id=n)
               for i, n in enumerate(ids)]
    write_manifest(records, work / "manifest.csv")
    out = outputs.write_outputs(result, scan, work / "res")
    for name in ("summary.csv", "scores.csv", "failures.csv", "manifest.csv"):
        cells = _cells(work / name)
        assert _no_formula(cells), f"{name}: {[c for c in cells if c[:1] in '=+-@']}"
    assert "-0.25" in _cells(work / "scores.csv"), "a negative number was altered"
    assert any(c.startswith("-") for c in _cells(out / "patches.csv")), "negative RAS coordinates altered"
    back = read_manifest(work / "manifest.csv", check_files=False)
    assert [r.scan_id for r in back] == ids, "the manifest does not read back the same ids"


# ----------------------------------------------------------------------------------------------
def run_cases(selected) -> list:
    import logging

    logging.disable(logging.WARNING)  # the cases provoke warnings on purpose
    results = []
    for name, group, what, fn in selected:
        with tempfile.TemporaryDirectory(prefix=f"attack-{name}-") as tmp:
            try:
                fn(Path(tmp))
                results.append((name, group, what, "pass", ""))
            except Skip as exc:
                results.append((name, group, what, "skip", str(exc)))
            except Exception as exc:  # noqa: BLE001 - every failure is a row in the table
                detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                if os.environ.get("ATTACK_CHECK_TRACEBACK"):
                    traceback.print_exc()
                results.append((name, group, what, "FAIL", detail))
    logging.disable(logging.NOTSET)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="run only cases whose id contains this text")
    args = parser.parse_args(argv)
    selected = [c for c in CASES if args.k in c[0]]
    results = run_cases(selected)
    width = max(len(r[0]) for r in results)
    print(f"{'case':<{width}}  {'group':<18}  result  what")
    for name, group, what, status, detail in results:
        print(f"{name:<{width}}  {group:<18}  {status:<6}  {what}" + (f"\n{'':<{width}}  {'':<18}          -> {detail}"
                                                                      if detail else ""))
    failed = sum(r[3] == "FAIL" for r in results)
    passed = sum(r[3] == "pass" for r in results)
    print(f"\n{passed} passed, {failed} failed, {len(results) - passed - failed} skipped of {len(results)} cases")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
