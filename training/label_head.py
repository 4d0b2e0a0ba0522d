"""DLILP's image-label head and its file beside each checkpoint (``<name>.labelhead.safetensors``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ZeroShotILDLib.errors import InputError

from .files import atomic_path

LABEL_HEAD_SUFFIX = ".labelhead.safetensors"
_LABEL_HEAD_KEY = "zeroshot_ild_label_head"


class LabelHead(torch.nn.Module):
    """DLILP's image-label head: a bias-free linear map of the CLIP image embedding, class prototypes
    and their own temperature.

    Because the map has no bias, it commutes with L2 normalisation of its input up to a positive
    factor, so it applies equally to raw and to L2-normalised image features (what the engine keeps).
    """

    def __init__(self, embed_dim: int, class_names: Sequence[str], prototypes: Optional[torch.Tensor] = None,
                 logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.class_names = tuple(class_names)
        self.projection = torch.nn.Linear(embed_dim, embed_dim, bias=False)
        with torch.no_grad():
            # Starts as the CLIP image space itself, where text-initialised prototypes make sense.
            self.projection.weight.copy_(torch.eye(embed_dim))
        init = prototypes if prototypes is not None else torch.randn(len(self.class_names), embed_dim)
        self.prototypes = torch.nn.Parameter(init.detach().clone().float())
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) image embeddings -> (N, D) L2-normalised image-label embeddings."""
        return F.normalize(self.projection(image_features), dim=-1)

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, C) scaled cosine similarities to the class prototypes."""
        prototypes = F.normalize(self.prototypes, dim=-1)
        return self.logit_scale.exp() * (self(image_features) @ prototypes.t())

    def class_probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot probabilities of the known classes: softmax over the prototypes, (N, C)."""
        return self.class_logits(image_features).softmax(dim=-1)


def save_label_head(path: Union[str, Path], head: LabelHead) -> Path:
    """Write a LabelHead as safetensors, class names in the metadata (written atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_LABEL_HEAD_KEY: json.dumps({"class_names": list(head.class_names)})})
    return path


def load_label_head(path: Union[str, Path], device: str = "cpu") -> LabelHead:
    """The DLILP label head saved beside a checkpoint (``<checkpoint>`` or ``<name>.labelhead.safetensors``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.name.endswith(LABEL_HEAD_SUFFIX):
        path = label_head_path(path)
    if not path.is_file():
        raise InputError(f"{path.name} does not exist: only DLILP runs write a label head")
    with safe_open(str(path), framework="pt", device=device) as handle:
        meta = json.loads((handle.metadata() or {}).get(_LABEL_HEAD_KEY, "{}"))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    names = meta.get("class_names") or []
    head = LabelHead(tensors["prototypes"].shape[1], names)
    head.load_state_dict(tensors)
    return head.eval()


def label_head_path(checkpoint: Union[str, Path]) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name[: -len(checkpoint.suffix)] + LABEL_HEAD_SUFFIX
                                if checkpoint.suffix else checkpoint.name + LABEL_HEAD_SUFFIX)
