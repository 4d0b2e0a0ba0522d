"""Fast mode: a cheap proposal pass over the candidates, then exact re-scoring of the best few.

The exact mode encodes every candidate patch in fp32 at the model's full input size. The proposal
pass encodes the same patches with a bfloat16 copy of the image tower, which CPUs with native
bf16 matrix units (Intel AMX / AVX512-BF16) run several times faster; optionally also at a few
tokens per side (ViT position embeddings interpolated to the smaller grid). Proposal scores rank
the candidates; the ``rescore`` best of them are encoded exactly, and the top-k and the montage
are chosen among those exact scores only.

On thin slices the proposal pass is coarse-to-fine in z: it encodes the candidate slices
``proposal_skip_within_mm`` of each other, then the skipped slices next to its best boxes (where the best
patches of the skipped slices are, since a box changes little over a millimetre or two), and gives
the remaining boxes features interpolated between their encoded neighbours.

Measured on random-weight ViT-B/32 (bench/RESULTS.md): bf16 at full resolution ranks the exact
top-16 within its top 22 of 3,155 (Spearman 0.999); lower input resolutions do not (32 px: the
exact top-16 spread to rank 1,222; 64 px: to 1,866), so the default proposal grid is the full one.
Skipping two of every three 1 mm slices (each skipped slice 1 mm from an encoded one) with the
neighbours of the best 2 x rescore boxes encodes 45-58 % of the candidates and still re-scored all of
the exact top-16 on three 1 mm phantoms, for both prompts tried; every other slice of a 1.5 mm CT
lost 1 of 16, so slices are skipped only within 1 mm of an encoded one by default.

Without native bf16 (most laptops and workstations; ``ZEROSHOT_ILD_CPU_BF16=0`` says so) a bf16 tower is
slower than fp32, so the proposal pass is the fp32 model itself at its own input size: each proposal
is an exact encoding and fast mode saves work only by encoding fewer candidates. It first encodes
the slices that leave each skipped one within ``settings.fp32_skip_within_mm`` (default 4 mm) of an
encoded one (every ninth 1 mm slice), then best-first: the candidates whose
score (exact, or interpolated in z) is among the best ``fp32_search_depth`` and not yet encoded, 64 at
a time, until those are all exact. Lower token grids were measured for this path and rejected: 4x4
tokens ran only 1.7x faster than 7x7 and ranked the exact top-16 down to 123 and 430 (of 1,142); so
was dynamic int8 (1.28x under oneDNN limited to AVX2). The search trusts scores interpolated over up to
4 mm: replayed for six prompts (bench/bench_fp32_search.py) it finds the exact top-16 for the default
prompt on the reference phantom, but as few as 13/16 for other prompts with random weights and 12/16
where a model's features change quickly between slices; skipping only within 1 mm would find >= 15/16 on
every input replayed, at ~0.42 of the candidates instead of ~0.24.

On a GPU the exact mode already runs under autocast and is fast, so fast mode encodes exactly there.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
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


#: Environment variable that overrides the CPU check: 0 = treat the CPU as having no fast bf16 (the
#: fp32 proposal pass), 1 = use the bf16 tower whatever /proc/cpuinfo says.
CPU_BF16_ENV = "ZEROSHOT_ILD_CPU_BF16"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16); elsewhere bf16 is slower.

    ``ZEROSHOT_ILD_CPU_BF16=0|1`` overrides the check: a CPU that lists the flags may still run bf16
    slowly (oneDNN limited by ``ONEDNN_MAX_CPU_ISA``, a virtual machine hiding AMX state).
    """
    value = os.environ.get(CPU_BF16_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise InputError(f"{CPU_BF16_ENV}={value!r} is not understood: set it to 0 (no fast bf16) or 1, or unset it")
    return _cpuinfo_has_bf16()


@lru_cache(maxsize=1)
def _cpuinfo_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


#: QuickGELU is x * sigmoid(QUICK_GELU_SCALE * x).
QUICK_GELU_SCALE = 1.702


def fold_quick_gelu(visual: torch.nn.Module) -> int:
    """Rewrite each ``Linear -> QuickGELU -> Linear`` MLP as ``Linear' -> SiLU -> Linear'``; returns how many.

    x * sigmoid(a x) = silu(a x) / a, so the first layer's weights and bias are scaled by a, the
    second layer's weights by 1/a, and the three element-wise passes of QuickGELU become one SiLU
    kernel: the same function, ~10 % faster for ViT-B/32 in bf16 on a CPU, where the element-wise
    work is a large share once the matrix multiplies run on AMX.
    """
    from open_clip.transformer import QuickGELU

    folded = 0
    for module in visual.modules():
        mlp = getattr(module, "mlp", None)
        if not isinstance(mlp, torch.nn.Sequential) or not isinstance(getattr(mlp, "gelu", None), QuickGELU):
            continue
        fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
        if not isinstance(fc, torch.nn.Linear) or not isinstance(proj, torch.nn.Linear):
            continue
        with torch.no_grad():
            fc.weight.mul_(QUICK_GELU_SCALE)
            if fc.bias is not None:
                fc.bias.mul_(QUICK_GELU_SCALE)
            proj.weight.div_(QUICK_GELU_SCALE)
        mlp.gelu = torch.nn.SiLU()
        folded += 1
    return folded


class _Bf16ImageTower(torch.nn.Module):
    """A bfloat16 copy of a CLIP image tower with the ``encode_image`` the encoders call."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        tower = copy.deepcopy(visual).float()
        fold_quick_gelu(tower)  # in fp32, before rounding the weights to bf16
        self.visual = tower.to(torch.bfloat16).eval()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels.to(torch.bfloat16)).float()


def proposal_model(model: LoadedModel) -> Optional[LoadedModel]:
    """The model the proposal pass runs, or None where a proposal pass would not pay.

    A bf16 copy of the image tower on CPUs with native bf16; elsewhere on a CPU the model itself in
    fp32, whose full-resolution proposals are exact encodings (see :func:`proposals_are_exact`), so
    there the pass saves work by skipping slices (and, optionally, tokens) only. None on a GPU (the
    exact mode already uses autocast there) and for models without an image tower.
    """
    if model.device.type != "cpu" or not hasattr(model.model, "visual"):
        return None
    if not cpu_has_fast_bf16():
        return model
    fast = copy.copy(model)
    fast.model = _Bf16ImageTower(model.model.visual)
    return fast


def proposal_precision(proposal: LoadedModel) -> str:
    """'bf16' for the bf16 tower, 'fp32' for the model itself."""
    return "bf16" if isinstance(proposal.model, _Bf16ImageTower) else "fp32"


def proposals_are_exact(proposal: LoadedModel, model: LoadedModel, grid_tokens: int) -> bool:
    """Whether a proposal encoding is the exact mode's encoding: the fp32 model at its own input size."""
    return proposal.model is model.model and int(grid_tokens) == full_grid_tokens(model)


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


#: Cost of an fp32 proposal encoding relative to an exact one (the same tower).
FP32_RELATIVE_COST = 1.0

#: Cost of a bf16 encoding relative to an fp32 one on a CPU with AMX (measured: 19 vs ~5-8 images/s
#: for ViT-B/32 on the shared 2-core machine; 0.4 keeps a margin).
BF16_RELATIVE_COST = 0.4


def proposals_pay_off(n_candidates: int, rescore: int, grid_tokens: int, full_grid_tokens: int,
                      relative_cost: float = BF16_RELATIVE_COST, n_proposals: Optional[int] = None) -> bool:
    """Whether proposal pass + re-scoring costs less than encoding every candidate exactly.

    Cost is counted in tokens (the transformer's work is about linear in them at these sizes):
    each of the ``n_proposals`` proposal encodings (default: every candidate) costs (1 + n^2) tokens
    times the relative cost of its precision, each exact encoding (1 + g^2).
    """
    n_proposals = n_candidates if n_proposals is None else int(n_proposals)
    proposal = n_proposals * (1 + grid_tokens ** 2) * relative_cost
    exact = (n_candidates - rescore) * (1 + full_grid_tokens ** 2)
    return proposal < exact


def expected_proposals(first_pass_count: int, n_candidates: int, rescore: int, step: int,
                       search_depth: Optional[int] = None) -> int:
    """Proposal encodings to expect: the first pass plus, in bf16, the refinement's at most 2 (step - 1)
    slice neighbours of each of the ``REFINE_PER_RESCORED x rescore`` best boxes, or, in fp32, the
    best-first search's ``search_depth``."""
    if search_depth is not None:
        refine = int(search_depth) if step > 1 else 0
    else:
        refine = REFINE_PER_RESCORED * int(rescore) * 2 * (int(step) - 1) if step > 1 else 0
    return min(int(n_candidates), int(first_pass_count) + refine)


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


# ----------------------------------------------------------------------------------------------
# Coarse-to-fine in z: the proposal pass on every few slices, then the neighbours of its best
# ----------------------------------------------------------------------------------------------
#: Skipped neighbours of the best ``REFINE_PER_RESCORED x rescore`` coarse boxes are encoded too. On the
#: 1 mm phantoms (every third slice encoded first) the exact top-16 were all re-scored from 1x up
#: (bench/RESULTS.md); 2x is the margin.
REFINE_PER_RESCORED = 2


#: Without native bf16 the proposal pass is the fp32 model itself (its encodings are exact), so it
#: saves work only by encoding fewer candidates: every slice within ``settings.fp32_skip_within_mm``
#: of an encoded one is skipped at first, then the search below fills in where the best are.
#: fp32 pass: candidates are encoded best-first, ``FP32_SEARCH_BATCH`` at a time, until the best
#: ``FP32_SEARCH_DEPTH_PER_TOP x max(top_k, montage patches)`` by score (exact where encoded,
#: interpolated in z elsewhere) are all encoded. Measured on the reference phantom with random ViT-B/32
#: (bench/RESULTS.md, issue 13): a depth of 384 for the top-16 kept 16/16 for both prompts tried at 24 %
#: of the candidates encoded; 256 kept 15/16 and 14/16.
FP32_SEARCH_DEPTH_PER_TOP = 24
FP32_SEARCH_BATCH = 64


def fp32_search_depth(n_candidates: int, top_k: int, montage_patches: int) -> int:
    return min(int(n_candidates), FP32_SEARCH_DEPTH_PER_TOP * max(int(top_k), int(montage_patches)))


def next_to_encode(scores: np.ndarray, encoded: np.ndarray, depth: int, batch: int) -> np.ndarray:
    """Up to ``batch`` not-yet-encoded candidates among the best ``depth`` by score (ties by index);
    empty when those are all encoded, which ends the fp32 pass's best-first search."""
    p = np.asarray(scores, dtype=np.float64)
    head = np.lexsort((np.arange(p.size), -p))[:int(depth)]
    return head[~encoded[head]][:int(batch)]


def proposal_slice_step(candidate_slice_mm: float, skip_within_mm: float) -> int:
    """Candidate slices from one proposal-pass slice to the next, so that each skipped one lies within
    ``skip_within_mm`` of an encoded one: 3 at 1 mm within 1 mm, 5 at 0.5 mm, 1 (every slice) when
    the candidate slices are farther apart than that or it is 0."""
    if not skip_within_mm or skip_within_mm <= 0:
        return 1
    # 1e-6: 1.0 mm within 1.0 mm must count as within, whatever the float rounding of the spacing.
    return 2 * int(math.floor(float(skip_within_mm) / float(candidate_slice_mm) + 1e-6)) + 1


def slice_neighbours(slice_index: np.ndarray, row0: np.ndarray, col0: np.ndarray, step: int,
                     stride: int = 1) -> np.ndarray:
    """(n, 2*(step-1)) index of the candidate at the same box -1, +1, -2, +2, ... candidate slices away; -1 if none.

    ``stride`` is the number of scan slices between candidate slices (``slice_step_mm``).
    """
    n = slice_index.size
    offsets = [d * int(stride) for k in range(1, step) for d in (-k, k)]
    if n == 0 or not offsets:
        return np.full((n, len(offsets)), -1, dtype=np.int64)
    # One sortable key per (slice, row, col); the grid is shared by all slices, so a box and its
    # neighbour differ in the slice only.
    span_r = int(row0.max()) + 1
    span_c = int(col0.max()) + 1
    key = (slice_index.astype(np.int64) * span_r + row0) * span_c + col0
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    out = np.full((n, len(offsets)), -1, dtype=np.int64)
    for k, dz in enumerate(offsets):
        wanted = key + dz * span_r * span_c
        at = np.clip(np.searchsorted(sorted_key, wanted), 0, n - 1)
        hit = sorted_key[at] == wanted
        out[hit, k] = order[at[hit]]
    return out


def first_pass(slice_index: np.ndarray, neighbours: np.ndarray, step: int, stride: int = 1) -> np.ndarray:
    """Candidates the first proposal pass encodes: every ``step``-th candidate slice, plus any box with no such neighbour.

    Slices are counted from the first candidate slice, ``stride`` scan slices apart. A box that
    exists only between coarse slices (the lung edge moves from slice to slice) has nothing to be
    interpolated from, so it is encoded itself.
    """
    z = np.asarray(slice_index, dtype=np.int64)
    coarse = ((z - (z.min() if z.size else 0)) // int(stride)) % step == 0
    if step == 1:
        return coarse
    has_coarse = np.zeros(z.size, dtype=bool)
    for k in range(neighbours.shape[1]):
        j = neighbours[:, k]
        has_coarse |= (j >= 0) & coarse[np.maximum(j, 0)]
    return coarse | ~has_coarse


def neighbours_to_refine(scores: np.ndarray, encoded: np.ndarray, neighbours: np.ndarray, count: int) -> np.ndarray:
    """Not-yet-encoded slice neighbours of the ``count`` best encoded candidates (ties by index)."""
    idx = np.flatnonzero(encoded)
    best = idx[np.lexsort((idx, -np.asarray(scores, dtype=np.float64)[idx]))[:count]]
    more = neighbours[best].ravel()
    more = np.unique(more[more >= 0])
    return more[~encoded[more]]


def interpolate_skipped(features: np.ndarray, encoded: np.ndarray, slice_index: np.ndarray,
                        neighbours: np.ndarray) -> np.ndarray:
    """Features of candidates not encoded, linearly interpolated in z from the nearest encoded boxes.

    For each skipped candidate the nearest encoded box below and above (same row and column)
    are weighted by their distance in slices and the result is L2-normalised like an encoding.
    ``first_pass`` guarantees at least one of them exists.
    """
    out = features.copy()
    skipped = np.flatnonzero(~encoded)
    if skipped.size == 0:
        return out
    z = np.asarray(slice_index, dtype=np.float64)
    below = np.full(skipped.size, -1, dtype=np.int64)
    above = np.full(skipped.size, -1, dtype=np.int64)
    for k in range(neighbours.shape[1]):  # columns run -1, +1, -2, +2, ...: nearest first
        j = neighbours[skipped, k]
        ok = (j >= 0) & encoded[np.maximum(j, 0)]
        side = below if k % 2 == 0 else above
        take = ok & (side < 0)
        side[take] = j[take]
    if np.any((below < 0) & (above < 0)):
        raise ValueError("a skipped candidate has no encoded neighbour to interpolate from")
    zs = z[skipped]
    w_below = np.where(below >= 0, 1.0 / np.maximum(zs - z[np.maximum(below, 0)], 1.0), 0.0)
    w_above = np.where(above >= 0, 1.0 / np.maximum(z[np.maximum(above, 0)] - zs, 1.0), 0.0)
    mix = (w_below[:, None] * features[np.maximum(below, 0)] + w_above[:, None] * features[np.maximum(above, 0)])
    mix /= np.linalg.norm(mix, axis=1, keepdims=True).clip(1e-12)
    out[skipped] = mix.astype(features.dtype)
    return out
