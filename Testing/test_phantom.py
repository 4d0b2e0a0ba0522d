"""Step 8: the synthetic chest HRCT generator (ZeroShotILDLib.phantom).

Phantoms are small (at most 32 x 96 x 96) so that the whole file runs in a few seconds.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.phantom import (
    MANIFEST_COLUMNS,
    PATTERNS,
    SUBTYPES,
    generate_cohort,
    generate_phantom,
    write_cohort,
)
from ZeroShotILDLib.scan import read_scan
from training.manifest import read_manifest
from training.reports import keyword_labels, parse_report, split_sentences

SHAPE = (32, 96, 96)
SPACING_MM = (3.5, 3.5, 8.0)
TINY = dict(shape_zyx=(12, 48, 48), spacing_mm=(7.0, 7.0, 20.0))
#: For tests about labels, reports and cohorts only (the image is coarse but complete).
MINI = dict(shape_zyx=(8, 32, 32), spacing_mm=(10.0, 10.0, 20.0))

IPF, SSC, HP = SUBTYPES
#: Words that mean disease in a report (checked with the report parser's negation handling).
DISEASE_WORDS = {"ild": ["interstitial lung disease", "fibrosis", "fibrotic", "reticulation", "honeycombing",
                         "ground-glass", "bronchiectasis", "pneumonitis", "interstitial pneumonia"]}


@pytest.fixture(scope="module")
def phantoms():
    """One normal chest and one of each subtype, same small grid."""
    out = {"normal": generate_phantom(11, shape_zyx=SHAPE, spacing_mm=SPACING_MM, ild=False)}
    for i, sub in enumerate(SUBTYPES):
        out[sub] = generate_phantom(20 + i, shape_zyx=SHAPE, spacing_mm=SPACING_MM, subtype=sub)
    return out


def _lung_slices(ph):
    return np.flatnonzero(ph.lung_mask.any(axis=(1, 2)))


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_phantom():
    a = generate_phantom(7, **TINY, subtype=HP)
    b = generate_phantom(7, **TINY, subtype=HP)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    np.testing.assert_array_equal(a.disease_mask, b.disease_mask)
    np.testing.assert_array_equal(a.airway_mask, b.airway_mask)
    assert a.labels == b.labels and a.report == b.report


def test_different_seed_gives_different_phantom():
    a = generate_phantom(7, **TINY, ild=False)
    b = generate_phantom(8, **TINY, ild=False)
    assert not np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.lung_mask, b.lung_mask)


def test_disease_changes_only_the_lungs_of_the_same_chest():
    # independent random streams: the same seed with and without ILD is the same chest
    normal = generate_phantom(3, **TINY, ild=False)
    sick = generate_phantom(3, **TINY, subtype=IPF)
    np.testing.assert_array_equal(normal.lung_mask, sick.lung_mask)
    assert sick.disease_mask.any() and not normal.disease_mask.any()


# ---------------------------------------------------------------------------------------------
# Geometry, masks and labels
# ---------------------------------------------------------------------------------------------
def test_geometry_and_dtypes(phantoms):
    ph = phantoms["normal"]
    assert ph.hu.shape == SHAPE and ph.hu.dtype == np.int16
    for mask in (ph.lung_mask, ph.disease_mask, ph.airway_mask):
        assert mask.shape == SHAPE and mask.dtype == bool
    assert ph.spacing_mm == pytest.approx(SPACING_MM)
    assert ph.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # centred on 0: the origin is minus half the extent
    extent = [(n - 1) * s for n, s in zip(SHAPE[::-1], SPACING_MM)]
    assert ph.origin_mm == pytest.approx([-e / 2 for e in extent])
    image = ph.to_sitk()
    assert image.GetSize() == SHAPE[::-1] and image.GetSpacing() == pytest.approx(SPACING_MM)


@pytest.mark.parametrize("key", ["normal", *SUBTYPES])
def test_labels_are_consistent_with_masks(phantoms, key):
    ph = phantoms[key]
    labels = ph.labels
    assert set(labels) >= {"ild", "subtype", "patterns", "seed", "benign", "disease_fraction"}
    assert ph.lung_mask.mean() > 0.03                  # two lungs of real size
    assert not (ph.lung_mask & ph.airway_mask).any()   # trachea and main bronchi are not lung
    assert ph.airway_mask.any()
    assert not (ph.disease_mask & ~ph.lung_mask).any()  # disease only inside the lungs
    if key == "normal":
        assert labels["ild"] is False and labels["subtype"] is None
        assert labels["patterns"] == [] and labels["disease_fraction"] == 0
        assert not ph.disease_mask.any()
    else:
        assert labels["ild"] is True and labels["subtype"] == key
        assert labels["patterns"] and set(labels["patterns"]) <= set(PATTERNS)
        assert labels["benign"] == []
        assert ph.disease_mask.any()
        assert 0 < labels["disease_fraction"] <= 1


def test_subtype_implies_ild_and_is_canonicalised():
    ph = generate_phantom(4, **MINI, subtype="  Systemic SCLEROSIS ")
    assert ph.labels["ild"] is True and ph.labels["subtype"] == SSC


def test_ild_without_subtype_draws_one_and_none_draws_both():
    ph = generate_phantom(4, **MINI, ild=True)
    assert ph.labels["ild"] is True and ph.labels["subtype"] in SUBTYPES
    drawn = [generate_phantom(s, **MINI).labels for s in range(6)]
    for labels in drawn:
        assert (labels["subtype"] is not None) == labels["ild"]
    assert {labels["ild"] for labels in drawn} == {True, False}


# ---------------------------------------------------------------------------------------------
# Hounsfield units per structure
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["normal", *SUBTYPES])
def test_lung_parenchyma_hu(phantoms, key):
    ph = phantoms[key]
    healthy = ph.lung_mask & ~ph.disease_mask
    assert -850 <= ph.hu[healthy].mean() <= -750
    # air in the trachea and main bronchi (their walls blur into the lumen at 3.5 mm voxels)
    assert ph.hu[ph.airway_mask].mean() < -700
    if ph.disease_mask.any():
        # fibrosis and ground glass are denser than healthy lung (cysts are air, so the mean)
        assert ph.hu[ph.disease_mask].mean() > ph.hu[healthy].mean() + 50


def _body(ph, z):
    """The body of slice z: its largest non-air component, holes (lungs, airways) filled."""
    body = ndimage.binary_fill_holes(ndimage.binary_opening(ph.hu[z] > -500))
    lab, n = ndimage.label(body)
    assert n >= 1
    body = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    return ndimage.binary_fill_holes(body)


@pytest.mark.parametrize("key", ["normal", IPF])
def test_body_soft_tissue_and_bone_hu(phantoms, key):
    ph = phantoms[key]
    hu = ph.hu
    nx = hu.shape[2]
    spine_max, both_sides_ribs, tissue_medians = [], 0, []
    slices = _lung_slices(ph)
    for z in slices:
        lung = ph.lung_mask[z]
        ys, xs = np.nonzero(lung)
        body = _body(ph, z)
        # soft tissue of the chest wall and mediastinum: body minus lungs, airways and bone
        wall = body & ~ndimage.binary_dilation(lung | ph.airway_mask[z], iterations=2) & (hu[z] < 200)
        tissue_medians.append(np.median(hu[z][wall]))
        # spine: on the midline, behind the middle of the lungs
        mid = nx // 2
        spine_max.append(hu[z, int(ys.mean()):, mid - 2:mid + 2].max())
        # ribs: bone lateral to each lung, at the lungs' antero-posterior level
        rows = slice(ys.min(), ys.max() + 1)
        right = (hu[z, rows, :xs.min()] > 200).any()
        left = (hu[z, rows, xs.max() + 1:] > 200).any()
        both_sides_ribs += bool(right and left)
    assert -120 <= np.median(tissue_medians) <= 80
    # discs between vertebrae are soft; most levels cut bone
    assert np.median(spine_max) > 300
    assert both_sides_ribs >= 0.6 * len(slices)
    # air around the body
    assert (hu[:, :2, :] < -900).mean() > 0.9


def test_padding_value_is_honoured_outside_the_field_of_view():
    ph = generate_phantom(6, **TINY, ild=False, padding_value=-2048)
    ny, nx = ph.hu.shape[1:]
    sx, sy = ph.spacing_mm[:2]
    yy, xx = np.mgrid[:ny, :nx]
    r_mm = np.hypot((xx - (nx - 1) / 2) * sx, (yy - (ny - 1) / 2) * sy)
    radius = min(nx * sx, ny * sy) / 2
    pad = ph.hu == -2048
    assert pad.any()
    # every slice has the same circular field of view
    assert (pad == pad[0]).all()
    assert (r_mm[pad[0]] > radius - 1e-6).all()
    assert pad[0][r_mm > radius + max(sx, sy)].all()
    assert not (ph.lung_mask & pad).any()
    plain = generate_phantom(6, **TINY, ild=False)
    assert plain.hu.min() > -1200
    np.testing.assert_array_equal(plain.hu[~pad], ph.hu[~pad])


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["normal", *SUBTYPES])
def test_report_sections(phantoms, key):
    ph = phantoms[key]
    parsed = parse_report(ph.report)
    assert parsed.findings and parsed.impression
    keys = [s.key for s in parsed.subsections]
    for heading in ("lung parenchyma", "airways", "pleura"):
        assert heading in keys
        assert next(s for s in parsed.subsections if s.key == heading).text.strip()
    assert parsed.lung_text and "Lung parenchyma:" in parsed.lung_text
    assert ph.report.index("FINDINGS") < ph.report.index("IMPRESSION")


@pytest.mark.parametrize("key", ["normal", *SUBTYPES])
def test_report_mentions_disease_only_for_positives(phantoms, key):
    ph = phantoms[key]
    found = keyword_labels(ph.report, DISEASE_WORDS)["ild"]
    assert found == int(ph.labels["ild"])
    impression = parse_report(ph.report).impression.lower()
    if ph.labels["ild"]:
        assert ph.labels["subtype"] in impression
        for pattern in ph.labels["patterns"]:
            assert pattern in ph.report.lower()
    else:
        assert "no" in impression.split()[0:3] or impression.startswith("normal")


def test_report_wording_varies_across_seeds():
    normals = [generate_phantom(s, **MINI, ild=False).report for s in range(5)]
    positives = [generate_phantom(s, **MINI, subtype=IPF).report for s in range(5)]
    for reports in (normals, positives):
        assert len(set(reports)) >= 4
        first_sentences = {split_sentences(parse_report(r).impression)[0] for r in reports}
        assert len(first_sentences) >= 2
    for r in normals:
        assert keyword_labels(r, DISEASE_WORDS)["ild"] == 0
    for r in positives:
        assert keyword_labels(r, DISEASE_WORDS)["ild"] == 1


# ---------------------------------------------------------------------------------------------
# Cohorts
# ---------------------------------------------------------------------------------------------
def test_generate_cohort_balance_and_seeds():
    cohort = list(generate_cohort(6, seed=3, positive_fraction=0.5, **MINI))
    assert len(cohort) == 6
    labels = [ph.labels for ph in cohort]
    assert sum(lb["ild"] for lb in labels) == 3
    assert sorted(lb["subtype"] for lb in labels if lb["ild"]) == sorted(SUBTYPES)
    seeds = [lb["seed"] for lb in labels]
    assert len(set(seeds)) == 6
    # any member can be regenerated alone from its stored seed
    one = cohort[4]
    again = generate_phantom(one.labels["seed"], **MINI, ild=one.labels["ild"], subtype=one.labels["subtype"])
    np.testing.assert_array_equal(one.hu, again.hu)
    # the cohort itself is reproducible, and a different seed gives another one
    assert [ph.labels for ph in itertools.islice(generate_cohort(6, seed=3, **MINI), 2)] == labels[:2]
    assert [ph.labels["seed"] for ph in itertools.islice(generate_cohort(6, seed=4, **MINI), 2)] != seeds[:2]


def test_generate_cohort_fractions_and_fixed_subtype():
    assert [ph.labels["ild"] for ph in generate_cohort(2, seed=0, positive_fraction=0.0, **MINI)] == [False, False]
    fixed = list(generate_cohort(2, seed=0, positive_fraction=1.0, subtype=HP, **MINI))
    assert [ph.labels["subtype"] for ph in fixed] == [HP, HP]
    assert list(generate_cohort(0)) == []


@pytest.mark.parametrize("fmt", [".nii.gz", ".nrrd"])
def test_write_cohort_files_and_manifest(tmp_path, fmt):
    manifest = write_cohort(tmp_path / "cohort", 3, seed=5, positive_fraction=2 / 3, fmt=fmt, **MINI)
    assert manifest == tmp_path / "cohort" / "manifest.csv"
    assert not list((tmp_path / "cohort").glob("*.part"))
    header = manifest.read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == list(MANIFEST_COLUMNS)
    records = read_manifest(manifest, require_report=True, require_ild=True)
    assert len(records) == 3
    assert sum(r.ild for r in records) == 2
    expected = list(generate_cohort(3, seed=5, positive_fraction=2 / 3, **MINI))
    for record, ph in zip(records, expected):
        assert record.scan_path.is_file() and record.scan_path.name.endswith(fmt)
        assert record.ild == int(ph.labels["ild"])
        assert record.subtype == ph.labels["subtype"]
        assert record.read_report() == ph.report
        assert record.patient_id and record.split is None
        scan = read_scan(record.scan_path)
        np.testing.assert_array_equal(scan.hu, ph.hu)
        assert scan.spacing_mm == pytest.approx(ph.spacing_mm)
        assert scan.origin_mm == pytest.approx(ph.origin_mm, abs=1e-3)
    assert len({r.patient_id for r in records}) == 3


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(shape_zyx=(2, 16, 16)), "too small"),
    (dict(shape_zyx=(4, 16)), "3 integers"),
    (dict(shape_zyx="big"), "3 integers"),
    (dict(spacing_mm=(1.0, 0.0, 1.0)), "spacing"),
    (dict(spacing_mm=(1.0, 1.0, float("nan"))), "spacing"),
    (dict(noise_hu=-1.0), "noise_hu"),
    (dict(noise_hu="loud"), "noise_hu"),
    (dict(padding_value=40000), "padding_value"),
    (dict(padding_value="air"), "padding_value"),
    (dict(padding_value=float("nan")), "padding_value"),
    (dict(subtype="influenza"), "Unknown ILD subtype"),
    (dict(subtype=IPF, ild=False), "subtype"),
    (dict(ild="no"), "ild must be"),
    (dict(table="wide"), "table must be"),
    (dict(position="decubitus"), "position must be"),
    (dict(table_gap_mm=-2.0), "table_gap_mm"),
    (dict(lung_hu=-200.0), "lung_hu"),
    (dict(lung_hu="deep"), "lung_hu"),
])
def test_bad_phantom_arguments_are_refused(kwargs, words):
    args = dict(TINY)
    args.update(kwargs)
    seed = args.pop("seed", 0)
    with pytest.raises(InputError, match=words) as info:
        generate_phantom(seed, **args)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Table, position and lung density (issue 15)
# ---------------------------------------------------------------------------------------------
def test_new_options_at_their_defaults_give_the_same_phantom():
    a = generate_phantom(5, **TINY, subtype=SSC)
    b = generate_phantom(5, **TINY, subtype=SSC, table="curved", table_gap_mm=None, position="supine", lung_hu=None)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    assert a.report == b.report


def _table_rows(ph):
    """Rows whose voxels outside the body are mostly not air: the table's shells and foam core."""
    outside = ~np.asarray(ph.body_mask)
    med = np.array([np.median(ph.hu[:, r][outside[:, r]]) if outside[:, r].any() else -1000.0
                    for r in range(ph.hu.shape[1])])
    return np.flatnonzero(med > -960)


@pytest.mark.parametrize("position", ["supine", "prone"])
def test_full_width_table_spans_the_field_of_view_on_the_right_side(position):
    ph = generate_phantom(9, shape_zyx=SHAPE, spacing_mm=SPACING_MM, ild=False, table="full", position=position)
    body = np.asarray(ph.body_mask)
    assert body[ph.lung_mask].all()
    rows = _table_rows(ph)
    body_rows = np.flatnonzero(body.any(axis=(0, 2)))
    assert rows.size >= 8  # 36 mm of table at 3.5 mm
    # +y (later rows) is posterior: the table is behind a supine patient, in front of a prone one.
    if position == "supine":
        assert rows.min() > body_rows.max()
    else:
        assert rows.max() < body_rows.min()
    table = ph.hu[:, rows, :]
    # As wide as the array, with a foam core of lung-like density between two shells.
    assert (table > -960).mean(axis=(0, 1)).min() > 0.9
    assert np.count_nonzero((table > -960) & (table < -880)) > np.count_nonzero(table > 0) > 0
    # The dependent lung is the denser one: posterior supine, anterior prone.
    lung_rows = np.flatnonzero(ph.lung_mask.any(axis=(0, 2)))
    mid = (lung_rows.min() + lung_rows.max()) // 2
    rows_idx = np.arange(ph.hu.shape[1])[None, :, None]
    front = np.median(ph.hu[ph.lung_mask & (rows_idx < mid)])
    back = np.median(ph.hu[ph.lung_mask & (rows_idx >= mid)])
    assert (back > front) == (position == "supine")


def test_table_touching_and_expiratory_lungs():
    ph = generate_phantom(9, shape_zyx=SHAPE, spacing_mm=SPACING_MM, ild=False, table="full", table_gap_mm=0.0,
                          lung_hu=-650.0)
    body = np.asarray(ph.body_mask)
    mid_col = ph.hu.shape[2] // 2
    below_skin = np.flatnonzero(body[0, :, mid_col]).max() + 1
    assert (ph.hu[:, below_skin, mid_col] > -500).all()   # the shell against the back
    assert -700 < np.median(ph.hu[ph.lung_mask]) < -600
    none = generate_phantom(9, shape_zyx=SHAPE, spacing_mm=SPACING_MM, ild=False, table="none")
    assert _table_rows(none).size == 0


@pytest.mark.parametrize("call,words", [
    (lambda: generate_cohort(-1), "Cohort size"),
    (lambda: generate_cohort(2.5), "Cohort size"),
    (lambda: generate_cohort(2, seed=-3), "Cohort seed"),
    (lambda: generate_cohort(2, positive_fraction=1.5), "positive_fraction"),
    (lambda: generate_cohort(2, positive_fraction="half"), "positive_fraction"),
    (lambda: generate_cohort(2, ild=True), "sets 'ild'"),
])
def test_bad_cohort_arguments_are_refused(call, words):
    with pytest.raises(InputError, match=words):
        call()


def test_bad_write_cohort_arguments_leave_nothing_behind(tmp_path):
    with pytest.raises(InputError, match="format"):
        write_cohort(tmp_path / "a", 1, fmt=".png")
    with pytest.raises(InputError, match="Cohort size"):
        write_cohort(tmp_path / "b", -1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_save_with_unknown_extension_is_refused(tmp_path):
    ph = generate_phantom(0, **MINI)
    with pytest.raises(InputError, match="extension"):
        ph.save(tmp_path / "scan.png.foo")


def test_add_full_width_table_to_a_scan():
    from ZeroShotILDLib.phantom import TABLE_CORE_MM, TABLE_SHELL_MM, add_full_width_table

    ph = generate_phantom(9, shape_zyx=SHAPE, spacing_mm=SPACING_MM, ild=False, table="none")
    body = np.asarray(ph.body_mask)
    top = np.flatnonzero(body.any(axis=(0, 2)))[0]
    hu, table = add_full_width_table(ph.hu, ph.spacing_mm, body, side="above", gap_mm=0.0, seed=1)
    rows = np.flatnonzero(table.any(axis=(0, 2)))
    n = sum(max(1, round(t / SPACING_MM[1])) for t in (TABLE_SHELL_MM, TABLE_CORE_MM, TABLE_SHELL_MM))
    assert rows.max() == top - 1 and rows.size == min(n, top)   # against the body, clipped by the edge
    assert table[:, rows, :].all() and not (table & body).any()
    np.testing.assert_array_equal(hu[~table], ph.hu[~table])
    with pytest.raises(InputError, match="side"):
        add_full_width_table(ph.hu, ph.spacing_mm, body, side="left")
    with pytest.raises(InputError, match="empty"):
        add_full_width_table(ph.hu, ph.spacing_mm, np.zeros_like(body))
