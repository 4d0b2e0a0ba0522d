"""The phantom-trained demo model: its training pairs, and the committed weights on fresh phantoms."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("lightning")

from zeroshot_ild_train import demo_model as dm  # noqa: E402
from zeroshot_ild_train import data as training_data  # noqa: E402
from ZeroShotILDLib.errors import InputError  # noqa: E402
from ZeroShotILDLib.results import PatchSet  # noqa: E402

SMALL = dm.PhantomGeometry((48, 128, 128), (2.5, 2.5, 2.5))


def test_box_disease_fraction_and_touch_follow_the_mask():
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[1, 0:2, 0:4] = True  # 8 voxels in the top-left box of slice 1
    boxes = PatchSet(np.array([1, 1, 0]), np.array([0, 4, 0]), np.array([0, 4, 0]), 4, 4, np.ones(3), np.zeros((3, 3)))
    assert dm.box_disease_fraction(mask, boxes).tolist() == [0.5, 0.0, 0.0]
    assert dm.patches_touch_disease(mask, boxes, [0, 1, 2]) == [True, False, False]


def test_patch_captions_carry_the_prompt_pair_and_parse_as_reports():
    rng = np.random.default_rng(0)
    sick = [dm.patch_caption(True, ["honeycombing"], "idiopathic pulmonary fibrosis", rng) for _ in range(40)]
    well = [dm.patch_caption(False, (), None, rng) for _ in range(40)]
    for text in sick + well:
        # What DAPT trains on (text choice findings+impression): the finding and the impression.
        joined = " ".join(training_data.report_sentences(text, "findings+impression"))
        finding, impression = text.split("LUNG PARENCHYMA: ")[1].split("\n\nIMPRESSION:\n")
        assert finding in joined and impression in joined
    assert all("honeycombing" in t.lower() for t in sick)
    assert any(t.endswith("\ninterstitial lung disease") for t in sick)
    assert any(t.endswith("\nno interstitial lung disease") for t in well)
    assert not any("no " in t.lower().split("impression:")[1] for t in sick)
    assert all(("no " in t.lower().split("impression:")[1]) or "normal" in t.lower() for t in well)


def test_bare_captions_are_the_engine_prompts_and_their_negatives():
    from ZeroShotILDLib.settings import AnalysisSettings

    rng = np.random.default_rng(1)
    sick = {dm.patch_caption(True, ["honeycombing", "reticulation"], None, rng, bare=1.0) for _ in range(200)}
    well = {dm.patch_caption(False, (), None, rng, bare=1.0) for _ in range(200)}
    texts = lambda captions: {" ".join(training_data.report_sentences(c, "findings+impression")) for c in captions}
    # the box's patterns, or "no <p>" for a prompted pattern it lacks (true of it too)
    assert texts(sick) == {"interstitial lung disease", "honeycombing", "reticulation", "no ground-glass opacity"}
    # exactly what the engine scores against: "no <prompt>" for every prompt, and the normal-lung text
    settings = AnalysisSettings(prompts=["interstitial lung disease", *dm.PATTERN_PROMPTS])
    assert texts(well) == {settings.negative_for(i) for i in range(4)} | {settings.normal_prompt}


def test_box_lung_share_judges_a_box_on_its_lung():
    lung = np.zeros((1, 8, 8), dtype=bool)
    lung[0, :, :2] = True                      # the box holds 2 columns of lung, 6 of chest wall
    disease = np.zeros_like(lung)
    disease[0, :, 0] = True                    # half of that lung is diseased
    boxes = PatchSet(np.array([0]), np.array([0]), np.array([0]), 8, 8, np.array([0.25]), np.zeros((1, 3)))
    assert dm.box_lung_share(disease, lung, boxes).tolist() == [0.5]
    assert dm.box_disease_fraction(disease, boxes).tolist() == [0.125]


def test_build_pairs_labels_every_pair_by_the_phantom_truth(tmp_path):
    recipe = dm.PairRecipe(n_phantoms=2, cohort_seed=5, geometries=(SMALL,), patches_diseased=4, patches_normal=4,
                           patches_per_pattern=0, patches_absent_per_pattern=3, retrieved_montages=1, image_size=32,
                           involvement=(0.3, 0.6))
    jsonl = dm.build_pairs(tmp_path / "pairs", recipe, progress=False)
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    by_scan = {}
    for row in rows:
        by_scan.setdefault(row["patient_id"], []).append(row)
    assert len(by_scan) == 2
    ild = sorted(int(rs[0]["subtype"] != "") for rs in by_scan.values())
    assert ild == [0, 1]  # generate_cohort's balance: one positive, one negative
    for scan_rows in by_scan.values():
        kinds = [r["kind"] for r in scan_rows]
        assert kinds.count("report") == 1 and kinds.count("retrieved") == 1
        positive = scan_rows[0]["subtype"] != ""
        patches = [r for r in scan_rows if r["kind"] == "patch"]
        # 4 diseased boxes, plus up to 3 per prompted pattern the box lacks, captioned "no <pattern>"
        absent = [r for r in patches if r["ild"] and r["report"].startswith("IMPRESSION:\nno ")]
        n_sick = sum(r["ild"] for r in patches)
        assert (4 < n_sick <= 4 + 3 * len(dm.PATTERN_PROMPTS)) if positive else n_sick == 0
        assert len(absent) >= n_sick - 4  # the extra ones are the "no <pattern>" hard negatives
        for r in absent:
            assert r["statements"] == [r["report"].split("\n")[1]] and r["statements"][0] in r["truths"]
        assert sum(1 - r["ild"] for r in patches) >= 3
        for r in scan_rows:
            if r["kind"] != "patch":
                assert r["ild"] == int(positive) and "IMPRESSION" in r["report"]
    from PIL import Image

    with Image.open(rows[0]["image_path"]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    records = dm.read_pairs(jsonl)
    assert len(records) == len(rows)
    # Truths then statements over the classes; every caption is true of its own image.
    half = len(dm.STATEMENTS)
    assert all(len(r.labels) == 2 * half for r in records)
    for r, row in zip(records, rows):
        truths, said = r.labels[:half], r.labels[half:]
        assert truths[dm.STATEMENTS.index("ild" if row["ild"] else "normal")] == 1.0
        assert sum(said) >= 1 and all(t >= s for t, s in zip(truths, said))
    # A second build with the same recipe reuses the finished folder.
    mtime = jsonl.stat().st_mtime_ns
    assert dm.build_pairs(tmp_path / "pairs", recipe, progress=False).stat().st_mtime_ns == mtime


def test_read_pairs_names_the_missing_build(tmp_path):
    from ZeroShotILDLib.errors import InputError

    with pytest.raises(InputError, match="demo_model build"):
        dm.read_pairs(tmp_path / "nothing.jsonl")


def test_committed_weights_are_the_registry_demo_model():
    from ZeroShotILDLib.models import get_spec, load_model, read_checkpoint_metadata

    assert dm.DEMO_WEIGHTS.is_file(), "ZeroShotILDLib/weights/phantom_demo.safetensors is missing"
    assert dm.DEMO_WEIGHTS.stat().st_size < 10_000_000
    meta = read_checkpoint_metadata(dm.DEMO_WEIGHTS)
    assert meta["architecture"] == dm.ARCHITECTURE and meta["training"]["dapt"]["loss"]
    assert get_spec("phantom-demo").architecture == dm.ARCHITECTURE
    loaded = load_model("phantom-demo", device="cpu")
    assert loaded.checkpoint is not None and loaded.checkpoint.resolve() == dm.DEMO_WEIGHTS.resolve()
    assert loaded.spec.meaningful


def test_demo_weights_beat_chance_and_random_retrieval_on_fresh_phantoms():
    # Seeds unlike the training cohort's; a small run of the benchmark in training/RESULTS.md
    # (3-100 % of the lung involved, boxes at the pleura included at the patch level).
    result = dm.evaluate(f"dapt:{dm.DEMO_WEIGHTS}", n=4, seed=31337, geometry=SMALL, bootstrap_resamples=0,
                         progress=False)
    scans = result["scans"]
    positives = [s["p_clip"] for s in scans if s["ild"]]
    negatives = [s["p_clip"] for s in scans if not s["ild"]]
    assert min(positives) > max(negatives)
    assert result["clip"]["overlap_percent_positive"] >= 50.0
    assert result["clip"]["overlap_percent_positive"] >= result["random"]["overlap_percent_positive"]
    patch = result["patch"]
    assert patch["interstitial lung disease | all styles"]["auroc"] >= 0.85
    for name in dm.PATTERN_PROMPTS:
        r = patch[f"{name} | vs normal"]
        assert r["n_positive"] == 0 or r["auroc"] >= 0.85, name


def test_covid_captions_are_cleaned_and_images_resolved_by_patient():
    from conftest import shared_data

    from zeroshot_ild_train import covid
    from zeroshot_ild_train.manifest import split_by_patient

    assert covid.clean_caption("['Figure 1. CT of  patient 1.', 'b. GGO.']") == "Figure 1. CT of patient 1. b. GGO."
    assert covid.clean_caption("Plain caption\n text") == "Plain caption text"
    assert covid._stem("case-p3-89%1.png") == "case-p3-89" and covid._stem("case-p17-78") == "case-p17-78"
    records = covid.read_covid_ct(shared_data("real", "pairs", "covid_ct"))
    assert len({r.scan_id for r in records}) == len(records)
    assert all(r.scan_path.is_file() for r in records)
    positives = [r for r in records if r.labels["covid"] == 1]
    assert len(positives) > 300 and len(records) - len(positives) > 300
    assert sum(bool(r.report_text) for r in positives) > 250
    assert not any(r.report_text for r in records if r.labels["covid"] == 0)  # non-COVID images have no text
    split = split_by_patient(records, val_fraction=0.1, test_fraction=0.3, seed=0)
    by_patient = {}
    for r in split:
        by_patient.setdefault(r.patient_key, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())  # never one patient in two splits


def test_statement_labels_make_a_caption_a_positive_of_every_image_it_is_true_of():
    """A fibrotic box holds reticulation *and* honeycombing: the caption "reticulation" of another box must be a
    positive of it (one class per caption made it a negative, and "reticulation" under-read fibrosis by half),
    while a ground-glass box is a negative of "honeycombing" and a positive of "no honeycombing"."""
    import torch

    from zeroshot_ild_train import losses

    fibrotic = dm.box_truths(True, ["honeycombing", "reticulation", "traction bronchiectasis"])
    glass = dm.box_truths(True, ["ground-glass opacity"])
    normal = dm.box_truths(False, ())
    texts = [("ild",), ("reticulation",), ("honeycombing",), ("no honeycombing",), ("normal",)]
    images = [fibrotic, glass, normal, fibrotic, glass]
    labels = torch.tensor([dm.pair_labels(t, s) for t, s in zip(images, texts)])
    truths, said = losses.split_statement_labels(labels, dm.CLASS_NAMES)
    targets = losses.unicl_targets(truths, said)
    #            texts: ild  ret  hc   no-hc normal
    assert targets.tolist() == [[1, 1, 1, 0, 0],    # fibrotic
                                [1, 1, 0, 1, 0],    # ground glass (its own text "reticulation" is pair 1's)
                                [0, 0, 1, 1, 1],    # normal (its own text "honeycombing": i == j)
                                [1, 1, 1, 1, 0],    # fibrotic, own text "no honeycombing" (i == j)
                                [1, 0, 0, 1, 1]]    # ground glass, own text "normal" (i == j)
    # plain class labels keep UniCL's share-a-label rule
    plain = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert losses.split_statement_labels(plain, ("ild", "no ild"))[1] is None
    with pytest.raises(InputError):
        dm.pair_labels(["ild", "emphysema"], ["ild"])
    with pytest.raises(ValueError):
        losses.split_statement_labels(labels, dm.CLASS_NAMES[:-1] + ("says: other",))
