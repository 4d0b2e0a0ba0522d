"""Prompt probabilities, CheXzero style.

For a finding, text features of ``"{finding}"`` and ``"no {finding}"`` are compared with
L2-normalised image features by raw cosine similarity (no logit scale), and the probability is
``exp(s_pos) / (exp(s_pos) + exp(s_neg))`` (CheXzero ``zero_shot.py``, ``run_softmax_eval``). With
several templates each template's embedding is normalised, averaged and re-normalised.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .models import LoadedModel

DEFAULT_TEMPLATES = ("{}",)


class TextEncoder:
    """Encodes prompts with a model and keeps the results, so re-prompting costs one text pass."""

    def __init__(self, model: LoadedModel, templates: Sequence[str] = DEFAULT_TEMPLATES):
        self.model = model
        self.templates = tuple(templates)
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, text: str) -> torch.Tensor:
        """(D,) float32 CPU unit vector for ``text`` averaged over the templates."""
        return self.embed_many([text])[0]

    def embed_many(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """``embed`` for several texts, the uncached ones in one text-encoder pass.

        One batched pass instead of one per text: a new prompt and its negative (and subtypes)
        cost one forward, which is most of a cold re-prompt on CPU.
        """
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            n = len(self.templates)
            tokens = self.model.tokenize([tpl.format(t) for t in missing for tpl in self.templates])
            with torch.inference_mode():
                feats = self.model.model.encode_text(tokens.to(self.model.device)).float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            for i, text in enumerate(missing):
                mean = feats[i * n:(i + 1) * n].mean(dim=0)
                self._cache[text] = (mean / mean.norm()).cpu()
        return [self._cache[t] for t in texts]

    def too_long(self, texts: Sequence[str]) -> dict[str, tuple[int, int]]:
        """{text: (tokens, context length)} for each of ``texts`` (with the templates) that the text encoder
        cuts off: a CLIP text tower reads a fixed number of tokens (77 for OpenAI CLIP) and drops the rest
        without a word, so a long prompt is scored on its beginning only."""
        tokenizer = self.model.tokenizer
        context = int(getattr(tokenizer, "context_length", 0) or 0)
        if not context:
            return {}
        out = {}
        for text in dict.fromkeys(texts):
            counts = [token_count(tokenizer, tpl.format(text)) for tpl in self.templates]
            longest = max((c for c in counts if c is not None), default=None)
            if longest is not None and longest > context:
                out[text] = (longest, context)
        return out

    def pair(self, positive: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        pos, neg = self.embed_many([positive, negative])
        return pos, neg


def token_count(tokenizer, text: str):
    """Tokens of ``text`` with its start and end tokens, as the text tower would read them uncut; None when the
    tokenizer does not say (open_clip's SimpleTokenizer: ``encode``; a Hugging Face one: ``tokenizer``)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and callable(inner):
        try:
            return len(inner(text)["input_ids"])
        except (TypeError, KeyError, ValueError):
            return None
    return None


def softmax_probability(image_features: np.ndarray, positive: torch.Tensor, negative: torch.Tensor,
                        logit_scale: float = 1.0) -> np.ndarray:
    """P(positive) per row of L2-normalised ``image_features`` (N, D).

    ``exp(a)/(exp(a)+exp(b))`` is computed as ``sigmoid(a-b)``, the same number without overflow
    once a logit scale is used.
    """
    feats = torch.as_tensor(np.asarray(image_features, dtype=np.float32))
    pos = feats @ positive.float()
    neg = feats @ negative.float()
    return torch.sigmoid(logit_scale * (pos - neg)).numpy().astype(np.float64)


def prompt_probabilities(image_features: np.ndarray, text: TextEncoder, prompts: Sequence[str],
                         negatives: Sequence[str]) -> dict[str, np.ndarray]:
    """{prompt: P(prompt) per image} for each (prompt, negative) pair."""
    text.embed_many([*prompts, *negatives])  # one text pass for all of them
    return {p: softmax_probability(image_features, *text.pair(p, n)) for p, n in zip(prompts, negatives)}
