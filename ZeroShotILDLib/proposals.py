"""Fast mode: a cheap proposal pass over every candidate, then exact re-scoring of the best few.

The exact mode encodes every candidate patch in fp32 at the model's full input size. The proposal
pass encodes the same patches with a bfloat16 copy of the image tower, which CPUs with native
bf16 matrix units (Intel AMX / AVX512-BF16) run several times faster; optionally also at a few
tokens per side (ViT position embeddings interpolated to the smaller grid). Proposal scores rank
the candidates; the ``rescore`` best of them are encoded exactly, and the top-k and the montage
are chosen among those exact scores only.

Measured on random-weight ViT-B/32 (bench/RESULTS.md): bf16 at full resolution ranks the exact
top-16 within its top 22 of 3,155 (Spearman 0.999); lower input resolutions do not (32 px: the
exact top-16 spread to rank 1,222; 64 px: to 1,866), so the default proposal grid is the full one.

On a GPU the exact mode already runs under autocast and is fast, so fast mode encodes exactly there.
"""
from __future__ import annotations

import contextlib
import copy
import math
from functools import lru_cache
from pathlib import Path
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


def supports_low_resolution(model: LoadedModel) -> bool:
    return _vision_transformer(model) is not None


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16); elsewhere bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


class _Bf16ImageTower(torch.nn.Module):
    """A bfloat16 copy of a CLIP image tower with the ``encode_image`` the encoders call."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = copy.deepcopy(visual).to(torch.bfloat16).eval()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels.to(torch.bfloat16)).float()


def proposal_model(model: LoadedModel) -> Optional[LoadedModel]:
    """The model the proposal pass runs: a bf16 copy of the image tower, or None where it would not pay.

    None on a GPU (the exact mode already uses autocast there) and on CPUs without native bf16.
    """
    if model.device.type != "cpu" or not cpu_has_fast_bf16() or not hasattr(model.model, "visual"):
        return None
    fast = copy.copy(model)
    fast.model = _Bf16ImageTower(model.model.visual)
    return fast


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


#: Cost of a bf16 encoding relative to an fp32 one on a CPU with AMX (measured: 19 vs ~5-8 images/s
#: for ViT-B/32 on the shared 2-core machine; 0.4 keeps a margin).
BF16_RELATIVE_COST = 0.4


def proposals_pay_off(n_candidates: int, rescore: int, grid_tokens: int, full_grid_tokens: int,
                      relative_cost: float = BF16_RELATIVE_COST) -> bool:
    """Whether proposal pass + re-scoring costs less than encoding every candidate exactly.

    Cost is counted in tokens (the transformer's work is about linear in them at these sizes):
    each proposal costs (1 + n^2) tokens times the bf16 relative cost, each exact encoding (1 + g^2).
    """
    proposal = n_candidates * (1 + grid_tokens ** 2) * relative_cost
    exact = (n_candidates - rescore) * (1 + full_grid_tokens ** 2)
    return proposal < exact


def full_grid_tokens(model: LoadedModel) -> int:
    """Tokens per side at the model's own input size (7 for ViT-B/32 at 224 px); 1 if not a ViT."""
    if _vision_transformer(model) is None:
        return 1
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
