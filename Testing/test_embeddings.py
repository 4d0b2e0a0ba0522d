import numpy as np
import pytest
import torch

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
