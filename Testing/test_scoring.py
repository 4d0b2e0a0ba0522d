"""CheXzero parity: our loader + scoring against CheXzero's zero_shot.py formula on the same weights."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ZeroShotILDLib import models
from ZeroShotILDLib.embeddings import ImageEncoder
from ZeroShotILDLib.scoring import TextEncoder, prompt_probabilities, softmax_probability

# CheXzero normalises 0-255 grayscale images with these (zero_shot.py / train.py).
CHEXZERO_MEAN_255 = 101.48761
CHEXZERO_STD_255 = 83.43944


def _chexzero_reference(ref_model, tokenizer, images_255: np.ndarray, labels, templates, pair=("{}", "no {}")):
    """CheXzero's zero_shot.py, written out: per label and template, normalised text embeddings are
    averaged and re-normalised (zeroshot_classifier); logits are cosine similarities (predict with
    softmax_eval=True); the probability is exp(pos) / (exp(pos) + exp(neg)) (run_softmax_eval)."""
    x = torch.from_numpy(images_255).float()[:, None].repeat(1, 3, 1, 1)
    x = (x - CHEXZERO_MEAN_255) / CHEXZERO_STD_255
    with torch.no_grad():
        img = ref_model.encode_image(x)
        img /= img.norm(dim=-1, keepdim=True)

        def weights(pattern):
            cols = []
            for label in labels:
                texts = [t.format(pattern.format(label)) for t in templates]
                emb = ref_model.encode_text(tokenizer(texts))
                emb /= emb.norm(dim=-1, keepdim=True)
                emb = emb.mean(dim=0)
                emb /= emb.norm()
                cols.append(emb)
            return torch.stack(cols, dim=1)

        pos = (img @ weights(pair[0])).numpy()
        neg = (img @ weights(pair[1])).numpy()
    return np.exp(pos) / (np.exp(pos) + np.exp(neg))


@pytest.fixture(scope="module")
def chexzero_checkpoint(tmp_path_factory):
    """Random ViT-B/32 (QuickGELU) weights saved as CheXzero saves them: torch.save(model.state_dict())."""
    import open_clip

    torch.manual_seed(1234)
    model = open_clip.create_model("ViT-B-32-quickgelu")
    folder = tmp_path_factory.mktemp("chexzero")
    path = folder / "best_64_5e-05_original_22000_0.864.pt"
    torch.save(model.state_dict(), path)
    yield path
    # 600 MB: gone with the module, not kept until the session ends (CI's disk is shared with three venvs).
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("templates", [("{}",), ("{}", "a chest CT showing {}", "{} on CT")])
def test_parity_with_chexzero_zero_shot(chexzero_checkpoint, templates):
    import open_clip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 224, 224)).astype(np.float32)
    labels = ["interstitial lung disease", "honeycombing"]

    ours = models.load_model("chexzero", checkpoint=str(chexzero_checkpoint), device="cpu")
    feats = ImageEncoder(ours, batch_size=2).encode(torch.from_numpy(images / 255.0)[:, None]).numpy()
    text = TextEncoder(ours, templates=templates)
    got = prompt_probabilities(feats, text, labels, [f"no {x}" for x in labels])

    ref_model = open_clip.create_model("ViT-B-32-quickgelu")
    ref_model.load_state_dict(torch.load(chexzero_checkpoint, weights_only=True))
    ref_model.eval()
    expected = _chexzero_reference(ref_model, open_clip.get_tokenizer("ViT-B-32-quickgelu"), images, labels, templates)
    for j, label in enumerate(labels):
        np.testing.assert_allclose(got[label], expected[:, j], rtol=0, atol=2e-6)
    # Random weights put every probability near 0.5, as CheXzero's unscaled softmax does.
    assert np.all(np.abs(expected - 0.5) < 0.1)


def test_softmax_probability_is_the_two_way_softmax():
    feats = F.normalize(torch.randn(5, 8), dim=-1).numpy()
    pos, neg = F.normalize(torch.randn(8), dim=0), F.normalize(torch.randn(8), dim=0)
    p = softmax_probability(feats, pos, neg)
    a, b = feats @ pos.numpy(), feats @ neg.numpy()
    np.testing.assert_allclose(p, np.exp(a) / (np.exp(a) + np.exp(b)), atol=1e-7)
    # With a logit scale it stays finite where exp() would overflow.
    assert np.all(np.isfinite(softmax_probability(feats, pos, neg, logit_scale=1e4)))


def test_text_embeddings_are_cached(tiny_model):
    text = TextEncoder(tiny_model)
    first = text.embed("honeycombing")
    assert text.embed("honeycombing") is first
    assert abs(float(first.norm()) - 1.0) < 1e-5
