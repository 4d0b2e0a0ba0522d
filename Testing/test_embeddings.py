import logging
import os

import numpy as np
import pytest
import torch

from ZeroShotILDLib import models
from ZeroShotILDLib.embeddings import EmbeddingCache, ImageEncoder, cache_key, scan_fingerprint


class _FlakyModel(torch.nn.Module):
    """Raises CUDA-style out-of-memory for batches above ``limit`` images."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.seen = []

    def encode_image(self, x):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.encode_image(x)


def test_batch_size_backs_off_on_out_of_memory(tiny_model):
    import copy

    model = copy.copy(tiny_model)
    flaky = _FlakyModel(tiny_model.model, limit=5)
    model.model = flaky
    enc = ImageEncoder(model, batch_size=16)
    pixels = torch.rand(20, 1, 64, 64)
    feats = enc.encode(pixels)
    assert feats.shape[0] == 20
    assert enc.batch_size <= 5
    reference = ImageEncoder(tiny_model, batch_size=20).encode(pixels)
    torch.testing.assert_close(feats, reference, atol=1e-5, rtol=1e-5)


def test_other_errors_are_not_swallowed(tiny_model):
    import copy

    class Broken(torch.nn.Module):
        def encode_image(self, x):
            raise RuntimeError("shape mismatch")

    model = copy.copy(tiny_model)
    model.model = Broken()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ImageEncoder(model).encode(torch.rand(2, 1, 64, 64))


def test_features_are_unit_length(tiny_model):
    feats = ImageEncoder(tiny_model).encode(torch.rand(3, 1, 64, 64))
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))


def test_disk_cache_round_trip_and_keys(tmp_path):
    hu = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    fp = scan_fingerprint(hu, (1, 1, 2))
    assert fp != scan_fingerprint(hu, (1, 1, 3)) and fp != scan_fingerprint(hu + 1, (1, 1, 2))
    key = cache_key(fp, "tiny", {"patch_mm": 30}, "exact")
    assert key != cache_key(fp, "tiny", {"patch_mm": 31}, "exact")
    cache = EmbeddingCache(tmp_path)
    cache.put(key, {"features": np.ones((3, 4), np.float32)})
    assert not list(tmp_path.glob("*.partial"))
    fresh = EmbeddingCache(tmp_path)
    np.testing.assert_array_equal(fresh.get(key)["features"], np.ones((3, 4)))
    (tmp_path / f"{key}.npz").write_bytes(b"garbage")
    assert EmbeddingCache(tmp_path).get(key) is None  # a damaged entry is ignored, not trusted


def _cached_entry(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = cache_key("scan", "model", {"patch_mm": 30}, "exact")
    cache.put(key, {"features": np.random.default_rng(0).random((50, 64)).astype(np.float32),
                    "exact": np.ones(50, bool)})
    return key, tmp_path / f"{key}.npz"


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_cache_file_warns_once_and_is_recomputed(tmp_path, caplog, damage):
    key, path = _cached_entry(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10  # inside the feature array: only the zip CRC notices
    else:
        data[data.index(b"{'descr'") + 12] ^= 0x01  # the .npy header of the first array
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert EmbeddingCache(tmp_path).get(key) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "\n" not in warnings[0]
    assert not path.exists()  # removed: the next put writes a sound entry


def test_damaged_cache_entry_is_recomputed_by_the_pipeline(tmp_path, small_scan, caplog):
    from conftest import tiny_settings
    from ZeroShotILDLib.pipeline import Analyzer

    settings = tiny_settings()
    first = Analyzer(settings, cache=EmbeddingCache(tmp_path)).analyze(small_scan)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        again = Analyzer(settings, cache=EmbeddingCache(tmp_path)).analyze(small_scan)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.ranked, first.ranked)
    assert again.finding_probabilities == pytest.approx(first.finding_probabilities)
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_checkpoints_with_one_stat_never_share_cache_entries(tmp_path, tiny_model):
    """Different weights of the same size and mtime (os.utime) must give different cache keys."""
    a = models.save_checkpoint(tmp_path / "a" / "m.safetensors", tiny_model.model, tiny_model.spec)
    other = {k: v + 1e-3 for k, v in tiny_model.model.state_dict().items()}
    changed = models.load_model("tiny-random", device="cpu")
    changed.model.load_state_dict(other)
    b = models.save_checkpoint(tmp_path / "b" / "m.safetensors", changed.model, tiny_model.spec)
    assert a.stat().st_size == b.stat().st_size
    for p in (a, b):
        os.utime(p, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    ida = models.load_model(f"dapt:{a}", device="cpu").identity
    idb = models.load_model(f"dapt:{b}", device="cpu").identity
    assert ida != idb
    # Moving a file does not change what it contains: the key follows the content, not the path.
    moved = tmp_path / "moved.safetensors"
    a.rename(moved)
    assert models.load_model(f"dapt:{moved}", device="cpu").identity == ida
