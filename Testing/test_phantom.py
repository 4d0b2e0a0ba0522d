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
from zeroshot_ild_train.manifest import read_manifest
from zeroshot_ild_train.reports import keyword_labels, parse_report, split_sentences

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
    # outside the circle all is padding, but for the generator's signature (row ROW, centre
    # columns), which a 48-column array cannot hold inside its circle
    from ZeroShotILDLib.phantom_signature import CODE, ROW, carries_signature

    outside = r_mm > radius + max(sx, sy)
    code = np.zeros_like(outside)
    code[ROW, nx // 2 - CODE.size // 2: nx // 2 - CODE.size // 2 + CODE.size] = True
    assert pad[0][outside & ~code].all() and carries_signature(ph.hu)
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


# ---------------------------------------------------------------------------------------------
# Involvement from 0 to 100 %, pattern regions and the signature (issue 20)
# ---------------------------------------------------------------------------------------------
#: Fingerprints (SHA-256 of the voxels without the signature row, the disease mask and the
#: report) of seed 9 as the generator drew it before ``involvement`` existed: the default draw
#: must stay the same phantom for every seed.
OLD_DEFAULTS = {
    (IPF, (12, 48, 48)): "a9ac617b72b759fc", (IPF, (32, 96, 96)): "98f97f694d576acd",
    (SSC, (12, 48, 48)): "00e23191a440480f", (SSC, (32, 96, 96)): "3af9967607209ca1",
    (HP, (12, 48, 48)): "008bc72a177da266", (HP, (32, 96, 96)): "7708f3c8fd41bb9c",
    (None, (12, 48, 48)): "156747f92318585f", (None, (32, 96, 96)): "37fb99637d6dc443",
}
INVOLVEMENTS = (0.0, 0.05, 0.4, 0.7, 1.0)


def _fingerprint(ph):
    import hashlib

    from ZeroShotILDLib.phantom_signature import ROW

    voxels = np.delete(ph.hu, ROW, axis=1)
    return hashlib.sha256(voxels.tobytes() + ph.disease_mask.tobytes() + ph.report.encode()).hexdigest()[:16]


@pytest.mark.parametrize("subtype,shape", sorted(OLD_DEFAULTS, key=str))
def test_default_draw_is_the_phantom_it_always_was(subtype, shape):
    geometry = TINY if shape == TINY["shape_zyx"] else dict(shape_zyx=SHAPE, spacing_mm=SPACING_MM)
    kwargs = dict(subtype=subtype) if subtype else dict(ild=False)
    ph = generate_phantom(9, **geometry, **kwargs)
    assert _fingerprint(ph) == OLD_DEFAULTS[(subtype, shape)]
    assert ph.labels["involvement"] is None
    if subtype:
        assert 0.12 <= ph.labels["disease_fraction"] <= 0.32
    # involvement=None is the default
    np.testing.assert_array_equal(ph.hu, generate_phantom(9, **geometry, **kwargs, involvement=None).hu)


@pytest.fixture(scope="module")
def involved():
    """Each style at each involvement, plus the density of its patterns, on the test grid."""
    out = {}
    for sub in SUBTYPES:
        for v in INVOLVEMENTS:
            out[sub, v] = generate_phantom(2, shape_zyx=SHAPE, spacing_mm=SPACING_MM, subtype=sub, involvement=v)
    return out


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_involvement_sets_the_disease_fraction(involved, subtype):
    for v in INVOLVEMENTS:
        ph = involved[subtype, v]
        got = ph.labels["disease_fraction"]
        assert got == pytest.approx(float(ph.disease_mask.sum()) / ph.lung_mask.sum(), abs=1e-4)
        assert abs(got - v) <= 0.03, (subtype, v, got)
        assert ph.labels["involvement"] == v
        if v == 0:
            assert ph.labels["ild"] is False and ph.labels["subtype"] is None and not ph.disease_mask.any()
            assert ph.pattern_masks == {} and ph.labels["patterns"] == []
        else:
            assert ph.labels["ild"] is True and ph.labels["subtype"] == subtype
    assert involved[subtype, 1.0].disease_mask.sum() == involved[subtype, 1.0].lung_mask.sum()
    # the same chest at every extent
    np.testing.assert_array_equal(involved[subtype, 0.0].lung_mask, involved[subtype, 1.0].lung_mask)


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_pattern_masks_are_subsets_of_the_disease_named_in_the_labels(involved, subtype):
    for v in INVOLVEMENTS[1:]:
        ph = involved[subtype, v]
        assert set(ph.pattern_masks) == set(ph.labels["patterns"])
        for name, mask in ph.pattern_masks.items():
            assert mask.dtype == bool and mask.shape == ph.disease_mask.shape
            assert mask.any() and not (mask & ~ph.disease_mask).any(), name
        absent = next(n for n in PATTERNS if n not in ph.pattern_masks) if len(ph.pattern_masks) < len(PATTERNS) else None
        if absent:
            assert not ph.pattern_mask(absent).any()


def test_every_style_draws_its_main_patterns_with_masks(phantoms):
    # default draws too: each positive carries the regions of what its report names
    for sub in SUBTYPES:
        ph = phantoms[sub]
        assert set(ph.pattern_masks) == set(ph.labels["patterns"])
    assert "ground-glass opacity" in phantoms[HP].pattern_masks
    assert not phantoms["normal"].pattern_masks


def _density(subtype, name, v, seeds=(2, 3, 4)):
    """Voxels of pattern ``name`` per involved voxel, pooled over a few seeds (None: never drawn)."""
    num = den = 0
    for seed in seeds:
        ph = generate_phantom(seed, shape_zyx=SHAPE, spacing_mm=SPACING_MM, subtype=subtype, involvement=v)
        if name in ph.pattern_masks:
            num += int(ph.pattern_masks[name].sum())
            den += int(ph.disease_mask.sum())
    return num / den if den else None


@pytest.mark.parametrize("subtype,name", [(IPF, "honeycombing"), (IPF, "reticulation"), (SSC, "reticulation")])
def test_patterns_stay_dense_when_the_disease_is_widespread(subtype, name):
    focal = _density(subtype, name, 0.15)
    assert focal and focal > 0.1
    for v in (0.7, 1.0):
        wide = _density(subtype, name, v)
        assert wide is not None and wide >= 0.75 * focal, (subtype, name, v, wide, focal)


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_widespread_disease_keeps_its_style_distribution(involved, subtype):
    ph = involved[subtype, 0.4]
    z = np.arange(ph.lung_mask.shape[0])[:, None, None]
    lung_z = ph.lung_mask * z
    mid = np.median(lung_z[ph.lung_mask])   # half the lung volume below, half above
    lower = (ph.disease_mask & (lung_z <= mid)).sum() / max((ph.lung_mask & (lung_z <= mid)).sum(), 1)
    upper = (ph.disease_mask & (lung_z > mid)).sum() / max((ph.lung_mask & (lung_z > mid)).sum(), 1)
    if subtype == HP:
        assert upper > lower        # upper and mid zones first
    else:
        assert lower > upper        # basal first
    if subtype == IPF:
        # subpleural first: the rind 0-2 voxels from the pleura is more involved than the core
        depth = ndimage.distance_transform_edt(ph.lung_mask)
        rind, core = ph.lung_mask & (depth <= 2), ph.lung_mask & (depth > 4)
        assert ph.disease_mask[rind].mean() > ph.disease_mask[core].mean()


def test_cohort_draws_involvement_over_a_range():
    cohort = list(generate_cohort(6, seed=3, involvement=(0.4, 0.9), **MINI))
    labels = [ph.labels for ph in cohort]
    # same seeds, order and subtypes as without the option
    assert [lb["seed"] for lb in labels] == [ph.labels["seed"] for ph in generate_cohort(6, seed=3, **MINI)]
    for lb in labels:
        if lb["ild"]:
            assert 0.4 <= lb["involvement"] <= 0.9
            assert abs(lb["disease_fraction"] - lb["involvement"]) <= 0.05
        else:
            assert lb["involvement"] == 0.0 and lb["disease_fraction"] == 0.0
    assert len({lb["involvement"] for lb in labels if lb["ild"]}) == 3
    fixed = list(generate_cohort(2, seed=3, positive_fraction=1.0, involvement=0.5, noise_hu=(5, 30), **MINI))
    assert all(ph.labels["involvement"] == 0.5 for ph in fixed)
    with pytest.raises(InputError, match="involvement"):
        list(generate_cohort(2, seed=3, involvement=(0.9, 0.4), **MINI))


@pytest.mark.parametrize("kwargs,words", [
    (dict(involvement=1.5), "involvement"),
    (dict(involvement=-0.1), "involvement"),
    (dict(involvement="most"), "involvement"),
    (dict(involvement=0.5, ild=False), "involvement"),
])
def test_bad_involvement_is_refused(kwargs, words):
    with pytest.raises(InputError, match=words):
        generate_phantom(0, **TINY, **kwargs)


def test_saved_phantom_carries_the_signature_and_an_edited_one_does_not(tmp_path):
    from ZeroShotILDLib.phantom_signature import carries_signature

    ph = generate_phantom(5, **TINY, subtype=IPF, padding_value=-2048)
    assert carries_signature(ph.hu)
    path = tmp_path / "renamed_real_ct.nii.gz"
    ph.save(path)
    assert carries_signature(read_scan(path).hu)
    # the same voxels with the code overwritten (e.g. a real CT, or a resampled phantom) do not
    edited = ph.hu.copy()
    edited[:, :4, :] = -1000
    assert not carries_signature(edited)
    ph.hu = edited
    ph.save(tmp_path / "phantom_0001.nii.gz")
    assert not carries_signature(read_scan(tmp_path / "phantom_0001.nii.gz").hu)


def test_with_patterns_draws_a_rare_combination_on_the_same_chest_and_zone():
    """Ground glass under UIP-like fibrosis (one lung in seven by the style's own draw) on request: the
    chest, lungs and diseased zone are those of the same seed without it; only the pattern is added."""
    kw = dict(shape_zyx=(40, 112, 112), spacing_mm=(3.0, 3.0, 3.0), subtype=SUBTYPES[0], involvement=0.5)
    plain = generate_phantom(5, **kw)
    assert "ground-glass opacity" not in plain.labels["patterns"]  # the seed's own draw has none
    forced = generate_phantom(5, with_patterns=["ground-glass opacity"], **kw)
    assert "ground-glass opacity" in forced.labels["patterns"]
    assert forced.labels["with_patterns"] == ["ground-glass opacity"]
    assert np.array_equal(plain.lung_mask, forced.lung_mask) and np.array_equal(plain.disease_mask, forced.disease_mask)
    ggo = forced.pattern_masks["ground-glass opacity"]
    assert not (ggo & ~forced.disease_mask).any() and ggo.sum() > 0.3 * forced.disease_mask.sum()
    # The added ground glass is denser than the haze of the same zone without it.
    zone = forced.disease_mask & ggo
    assert np.median(forced.hu[zone]) > np.median(plain.hu[zone]) + 50
    with pytest.raises(InputError, match="not drawn by the hypersensitivity pneumonitis style"):
        generate_phantom(5, shape_zyx=(40, 112, 112), spacing_mm=(3.0, 3.0, 3.0), subtype=SUBTYPES[2],
                         with_patterns=["honeycombing"])
    with pytest.raises(InputError, match="list of pattern names"):
        generate_phantom(5, with_patterns=7, **kw)
    # Normal lungs ignore it.
    assert generate_phantom(5, ild=False, with_patterns=["ground-glass opacity"], **{k: v for k, v in kw.items()
                            if k in ("shape_zyx", "spacing_mm")}).labels["patterns"] == []
