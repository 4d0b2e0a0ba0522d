"""Shared fixtures: the tiny random model, small phantoms and the real data folder (when present)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

# Keep tests on the two CI cores predictable and off any GPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The weights-hash memo lives in the user's cache; tests that need it point it at tmp_path themselves.
os.environ.setdefault("ZEROSHOT_ILD_HASH_MEMO", "")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test when the folder is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives beside the repo in ../shared)")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    from ZeroShotILDLib.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def small_phantom():
    from ZeroShotILDLib.phantom import generate_phantom

    return generate_phantom(3, shape_zyx=(48, 128, 128), spacing_mm=(2.5, 2.5, 5.0),
                            subtype="idiopathic pulmonary fibrosis")


@pytest.fixture(scope="session")
def small_scan(small_phantom):
    from ZeroShotILDLib.scan import scan_from_array

    p = small_phantom
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source="phantom")


def tiny_settings(**overrides):
    from ZeroShotILDLib.settings import AnalysisSettings

    # Exact scoring: these tests check the reference path (fast mode has its own tests).
    base = dict(model="tiny-random", device="cpu", patch_mm=30.0, slice_step_mm=5.0, batch_size=32,
                scoring_mode="exact")
    base.update(overrides)
    return AnalysisSettings(**base)


@contextmanager
def self_referenced():
    """Random weights have no normal-lung reference; inside this block every analysis is calibrated against its
    own scan's contrasts (median, robust SD), so that a low ``extent_z`` marks some boxes positive."""
    import numpy as np

    from ZeroShotILDLib.pipeline import Analyzer

    def references(self, prompts):
        out = {}
        for prompt, scores in self.contrast_scores(prompts).items():
            centre = float(np.median(scores))
            spread = 1.4826 * float(np.median(np.abs(scores - centre))) or 1.0
            out[prompt] = {"centre": centre, "spread": spread, "scans": 1, "patches": int(scores.size)}
        return out, ""

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Analyzer, "references", references)
        yield
