"""Fast mode: a cheap proposal pass over every candidate, then exact re-scoring of the best few.

The exact mode encodes every candidate patch at the model's full input size (224 px for ViT-B/32:
49 tokens). The proposal pass encodes the same patches at a few tokens per side (e.g. 32 px = one
token for ViT-B/32) with the ViT's position embeddings interpolated to that grid, which costs
about 1/25 of a full encoding. Proposal scores rank the candidates; the ``rescore`` best of them
are then encoded exactly, and the top-k and the montage are chosen among those exact scores only.
The fidelity against the exact mode (share of the exact top-16 kept, montage probability
difference) is measured by ``bench/bench_speed.py`` and written to ``bench/RESULTS.md``.

Only open_clip ``VisionTransformer`` towers can be run at another resolution; for any other image
tower the proposal pass is skipped and fast mode encodes every candidate exactly.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .models import LoadedModel


def _vision_transformer(model: LoadedModel):
    """The open_clip ViT image tower if it can take a smaller input, else None."""
    visual = getattr(model.model, "visual", None)
    pos = getattr(visual, "positional_embedding", None)
    conv = getattr(visual, "conv1", None)
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or not isinstance(conv, torch.nn.Conv2d):
        return None
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:  # no single class token in front of a square grid
        return None
    return visual


def supports_proposals(model: LoadedModel) -> bool:
    return _vision_transformer(model) is not None


def token_px(model: LoadedModel) -> int:
    """Pixels per ViT token side (32 for ViT-B/32)."""
    visual = _vision_transformer(model)
    if visual is None:
        raise ValueError("the model's image tower is not an open_clip VisionTransformer")
    return int(visual.conv1.kernel_size[0])


def proposal_image_size(model: LoadedModel, grid_tokens: int) -> int:
    """Input side in pixels for a proposal pass with ``grid_tokens`` x ``grid_tokens`` tokens."""
    return token_px(model) * int(grid_tokens)


def resize_position_embedding(pos: torch.Tensor, grid_tokens: int) -> torch.Tensor:
    """(1 + g*g, W) class + grid position embeddings -> (1 + n*n, W) for an n x n token grid.

    The grid part is resampled as an image (bicubic, antialiased when shrinking), so each new token
    gets the average position code of the region it covers; the class embedding is kept.
    """
    cls, grid = pos[:1], pos[1:]
    g = math.isqrt(grid.shape[0])
    n = int(grid_tokens)
    if n == g:
        return pos
    image = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(n, n), mode="bicubic", align_corners=False, antialias=n < g)
    return torch.cat([cls.float(), image.permute(0, 2, 3, 1).reshape(n * n, -1)]).to(pos.dtype)


@contextlib.contextmanager
def low_resolution(model: LoadedModel, grid_tokens: int) -> Iterator[int]:
    """Run the ViT on ``grid_tokens``^2 tokens inside the block; yields the input side in pixels.

    The position embedding is swapped for an interpolated copy and always put back, also when the
    block raises (e.g. a cancel), so exact encodings never see the low-resolution table.
    """
    visual = _vision_transformer(model)
    if visual is None:
        raise ValueError("the model's image tower is not an open_clip VisionTransformer")
    original = visual.positional_embedding
    resized = resize_position_embedding(original.detach(), grid_tokens)
    visual.positional_embedding = torch.nn.Parameter(resized, requires_grad=False)
    try:
        yield proposal_image_size(model, grid_tokens)
    finally:
        visual.positional_embedding = original


def rescore_count(n_candidates: int, *, top_k: int, montage_patches: int, rescore_fraction: float,
                  rescore_min: int) -> int:
    """How many proposal-ranked candidates are encoded exactly (never fewer than the montage needs)."""
    wanted = max(int(rescore_min), int(top_k), int(montage_patches), math.ceil(rescore_fraction * n_candidates))
    return min(int(n_candidates), wanted)


def proposals_pay_off(n_candidates: int, rescore: int, grid_tokens: int, full_grid_tokens: int) -> bool:
    """Whether proposal pass + re-scoring costs less than encoding every candidate exactly.

    Cost is counted in tokens (the transformer's work is about linear in them at these sizes):
    each proposal costs (1 + n^2) tokens, each exact encoding (1 + g^2).
    """
    proposal = n_candidates * (1 + grid_tokens ** 2)
    exact = (n_candidates - rescore) * (1 + full_grid_tokens ** 2)
    return proposal < exact


def full_grid_tokens(model: LoadedModel) -> int:
    return model.image_size // token_px(model)


def select_for_rescoring(proposal_probabilities: np.ndarray, count: int,
                         already_exact: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the ``count`` best candidates by proposal score that are not yet encoded exactly.

    Ties are broken by candidate order, as in ``ranking.rank_patches``.
    """
    p = np.asarray(proposal_probabilities, dtype=np.float64)
    order = np.lexsort((np.arange(p.size), -p))[:count]
    if already_exact is not None:
        order = order[~already_exact[order]]
    return order


def rank_exact_first(probabilities: np.ndarray, exact: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` candidates: exactly scored ones first, each group by probability, ties by index."""
    p = np.asarray(probabilities, dtype=np.float64)
    order = np.lexsort((np.arange(p.size), -p, ~np.asarray(exact, dtype=bool)))
    return order[:min(int(k), p.size)]
