"""Gathering features across processes so that contrastive losses see the global batch.

A contrastive loss on each GPU's local batch only would see a fraction of the negatives. Instead
every rank gathers all ranks' features (keeping the autograd graph of its own rows, through
torch's autograd-aware ``all_gather`` as Lightning's ``all_gather(sync_grads=True)`` does) and computes
the loss over the whole global batch; every rank then holds the same loss value.

Gradient bookkeeping: each rank differentiates the same global loss L, so the gradient reaching
rank r's local rows must be the sum over ranks of dL/d(rows of r); the backward pass therefore
all-reduces (sums) the incoming gradient and keeps its own slice. Each rank's parameter gradient
is then ``world_size * J_r^T dL/dz_r``, and DDP's gradient averaging turns that into exactly
``sum_r J_r^T dL/dz_r``, the single-process gradient of L on the global batch. Parameters used
directly by the loss (``logit_scale``, prototypes) get the full gradient on every rank, which
averaging leaves unchanged.

Ranks may hold different numbers of rows (a last, smaller validation batch): sizes are exchanged
first and rows padded for the collective, then trimmed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sizes(local_rows: int, device: torch.device) -> list[int]:
    size = torch.tensor([local_rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    largest = max(sizes)
    padded = tensor.new_zeros((largest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (rows, ...) from every rank in rank order, differentiably.

    The collective is ``torch.distributed.nn.functional.all_gather`` -- the same autograd-aware
    gather that Lightning's ``LightningModule.all_gather(..., sync_grads=True)`` uses -- whose
    backward sums the incoming gradients over ranks and returns this rank's slice (see the
    module docstring). It needs equal shapes on every rank, so rows are zero-padded to the
    largest share first (``torch.cat`` keeps the graph) and the padding is trimmed afterwards.

    Returns ``tensor`` itself when not running distributed. Every rank must call this the same
    number of times in the same order (it is a collective).
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    sizes = _sizes(tensor.shape[0], tensor.device)
    largest = max(sizes)
    if tensor.shape[0] < largest:
        pad = tensor.new_zeros((largest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    parts = all_gather(tensor.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank (labels, masks): no autograd, no-op when single-process."""
    if not is_distributed():
        return tensor
    sizes = _sizes(tensor.shape[0], tensor.device)
    if tensor.dtype == torch.bool:  # gloo has no bool collectives
        return _gather_padded(tensor.detach().to(torch.uint8), sizes).to(torch.bool)
    return _gather_padded(tensor.detach(), sizes)
