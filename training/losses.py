"""Contrastive losses for domain-adaptive pre-training (DAPT), as pure functions on feature tensors.

Conventions shared by every function here:

- Feature rows are L2-normalised embeddings, shape (N, D); row ``i`` of each argument belongs to
  sample ``i`` of the (global) batch. The losses do not normalise their inputs, except the
  learnable class prototypes of UniCL-with-prototypes / DLILP, which are raw parameters.
- ``logit_scale`` is the multiplier 1/tau applied to cosine similarities, i.e.
  ``model.logit_scale.exp()`` for an open_clip model (a 0-d tensor or a float). Clamping it to
  ln(100) on the log scale is the training module's job, not the loss's.
- Every loss is a mean over samples (and over both directions where it is symmetric), so its size
  does not grow with the batch.

References: paper 001 (relaxed positive-pair similarity eq. 3, CLIP eqs. 4-5, SLIP eqs. 6-8,
UniCLIP eqs. 9-10) and paper 002 (UniCL, DLILP); see ``../shared/notes/models.md``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

Scale = Union[torch.Tensor, float]

#: Paper 001's defaults for the relaxed similarity of positive pairs.
RELAX_THRESHOLD = 0.5
RELAX_SLOPE = 10.0


def relaxed_similarity(cosine: torch.Tensor, *, threshold: float = RELAX_THRESHOLD,
                       slope: float = RELAX_SLOPE) -> torch.Tensor:
    """Paper 001's eq. 3 for positive pairs: a similarity that saturates once it passes ``threshold``.

    Parameters
    ----------
    cosine : Tensor
        Cosine similarities of positive pairs, any shape, values in [-1, 1].
    threshold : float, optional
        t in (0, 1). At and above t the similarity is ``sigmoid(slope * (cosine - t))``, so
        positives that are already close stop being pulled together (default 0.5).
    slope : float, optional
        alpha, the slope of the sigmoid (default 10).

    Returns
    -------
    Tensor
        Same shape: ``sigmoid(slope*(s - t))`` if ``s >= t``; ``s / (2t)`` if ``0 <= s < t``;
        ``s`` if ``s < 0``. The pieces meet at ``s = t`` (0.5) and ``s = 0`` (0), so the function
        is continuous.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    high = torch.sigmoid(slope * (cosine - threshold))
    middle = cosine / (2.0 * threshold)
    return torch.where(cosine >= threshold, high, torch.where(cosine >= 0, middle, cosine))


def relaxation_active(cosine: torch.Tensor, *, threshold: float = RELAX_THRESHOLD) -> torch.Tensor:
    """Where eq. 3 changes a positive pair's similarity: ``cosine >= threshold`` (bool, same shape).

    Below the threshold the relaxed similarity is ``s / (2t)`` (``s`` for negative cosines); at
    paper 001's t = 0.5 that is ``s / 1.0 = s``, so a relaxed CLIP loss equals the plain one bit
    for bit until some positive cosine reaches t. This mask is what a run counts to report how
    often the relaxation was active.
    """
    return cosine >= threshold


def _relax_positions(similarity: torch.Tensor, positive: torch.Tensor, threshold: float, slope: float) -> torch.Tensor:
    """``similarity`` with eq. 3 applied where the boolean mask ``positive`` is set."""
    return torch.where(positive, relaxed_similarity(similarity, threshold=threshold, slope=slope), similarity)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scale, *,
              relaxed: bool = False, threshold: float = RELAX_THRESHOLD, slope: float = RELAX_SLOPE) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (paper 001 eqs. 4-5), optionally with eq. 3 on the positive pairs.

    Parameters
    ----------
    image_features, text_features : Tensor
        (N, D) L2-normalised; row i of each is a positive pair, every other combination a negative.
    logit_scale : Tensor or float
        1/tau, multiplies the similarities before the softmax.
    relaxed : bool, optional
        Replace the similarity of the N positive pairs (the diagonal only) by
        :func:`relaxed_similarity` (paper 001's "loss relaxation"); default False.
    threshold, slope : float, optional
        t and alpha of :func:`relaxed_similarity` (defaults 0.5 and 10).

    Returns
    -------
    Tensor
        0-d: ``(mean_i CE(image i -> texts) + mean_i CE(text i -> images)) / 2``.
    """
    n = image_features.shape[0]
    if n == 0:
        return image_features.sum() * 0.0
    similarity = image_features @ text_features.t()
    if relaxed:
        eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
        similarity = _relax_positions(similarity, eye, threshold, slope)
    logits = logit_scale * similarity
    target = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def nt_xent_loss(view1: torch.Tensor, view2: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent between two augmented views (paper 001 eqs. 6-7).

    Parameters
    ----------
    view1, view2 : Tensor
        (N, D) L2-normalised embeddings of two augmentations of the same N images.
    temperature : float, optional
        tau of the self-supervised term (default 0.1, SLIP's value).

    Returns
    -------
    Tensor
        0-d: mean over the 2N views of ``-log softmax`` of the other view of the same image among
        all 2N - 1 other views.
    """
    n = view1.shape[0]
    z = torch.cat([view1, view2], dim=0)
    logits = (z @ z.t()) / temperature
    # A view is never its own candidate (eq. 6 sums over j != i).
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def slip_loss(image_features: torch.Tensor, text_features: torch.Tensor, strong1: torch.Tensor, strong2: torch.Tensor,
              logit_scale: Scale, *, ssl_weight: float = 1.0, ssl_temperature: float = 0.1, relaxed: bool = False,
              threshold: float = RELAX_THRESHOLD, slope: float = RELAX_SLOPE) -> torch.Tensor:
    """SLIP (paper 001 eq. 8): CLIP loss plus ``ssl_weight`` x NT-Xent between two strong augmentations.

    ``image_features`` are the (weakly augmented) images paired with ``text_features``;
    ``strong1``/``strong2`` are two strongly augmented views of the same images, all (N, D) and
    L2-normalised. ``ssl_weight`` is 1 in the paper; ``ssl_temperature`` is SLIP's fixed 0.1.
    """
    contrastive = clip_loss(image_features, text_features, logit_scale, relaxed=relaxed, threshold=threshold, slope=slope)
    return contrastive + ssl_weight * nt_xent_loss(strong1, strong2, temperature=ssl_temperature)


def uniclip_loss(original: torch.Tensor, weak: torch.Tensor, text: torch.Tensor, logit_scale: Scale, *,
                 relaxed: bool = False, threshold: float = RELAX_THRESHOLD, slope: float = RELAX_SLOPE) -> torch.Tensor:
    """UniCLIP (paper 001 eqs. 9-10): original, weakly augmented and text embeddings in one space.

    The 3N embeddings ``z = [original; weak; text]`` are compared all against all. Sample i owns
    the positives {i, i+N, i+2N} (itself included, as in eq. 9); each of its three positives is
    scored against the 3N - 3 negatives alone, i.e. the other two positives are left out of that
    term's denominator:

        l_i = -1/3 * sum_{p in P(i)} log( e^{s_ip/tau} / (e^{s_ip/tau} + sum_{j not in P(i)} e^{s_ij/tau}) )

    and the loss is the mean of l_i over all 3N rows. With ``relaxed`` the image-text positive
    pairs (original-text and weak-text, both directions) use :func:`relaxed_similarity`, as in the
    paper's algorithm 3; image-image positives keep the plain cosine.

    Parameters
    ----------
    original, weak, text : Tensor
        (N, D) L2-normalised embeddings of the un-augmented image, a weak augmentation of it, and
        its text.
    logit_scale : Tensor or float
        1/tau.
    """
    n = original.shape[0]
    z = torch.cat([original, weak, text], dim=0)
    similarity = z @ z.t()
    owner = torch.arange(3 * n, device=z.device) % n
    positive = owner[:, None] == owner[None, :]
    if relaxed:
        modality = torch.arange(3 * n, device=z.device) // n  # 0 original, 1 weak, 2 text
        cross_modal = (modality[:, None] == 2) != (modality[None, :] == 2)
        similarity = _relax_positions(similarity, positive & cross_modal, threshold, slope)
    logits = logit_scale * similarity
    # log-sum-exp over the negatives of each row, then one term per positive.
    negatives_lse = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
    positive_logits = logits[positive].view(3 * n, 3)
    per_term = positive_logits - torch.logaddexp(positive_logits, negatives_lse.expand(-1, 3))
    return -per_term.mean()


#: Class names starting with this are what a pair's *text* says (see :func:`split_statement_labels`).
SAYS_PREFIX = "says: "


def split_statement_labels(labels: torch.Tensor, class_names) -> tuple:
    """(truths, statements) of labels laid out as C truth columns then C ``SAYS_PREFIX`` columns, or
    (labels, None) for plain class labels.

    Why two halves: UniCL's "share a label" makes a box with reticulation *and* honeycombing, captioned
    "honeycombing", a positive of every other reticulation box's caption "reticulation" only by
    accident of which pattern its caption named. With what the image holds and what the text says
    kept apart, a text is a positive of exactly the images it is true of (:func:`statement_targets`).
    """
    names = list(class_names or ())
    says = [i for i, n in enumerate(names) if str(n).startswith(SAYS_PREFIX)]
    if not says:
        return labels, None
    half = len(names) // 2
    if len(says) != half or says != list(range(half, len(names))) or \
            [n[len(SAYS_PREFIX):] for n in names[half:]] != names[:half]:
        raise ValueError("statement labels need C truth classes followed by the same C classes prefixed "
                         f"{SAYS_PREFIX!r}")
    return labels[:, :half], labels[:, half:]


def statement_targets(truths: torch.Tensor, statements: torch.Tensor) -> torch.Tensor:
    """S[i, j] = 1 when text j says something (a non-empty statement set) and all of it is true of image i
    (``statements[j] <= truths[i]``), or i == j (its own text)."""
    truths, statements = truths.float(), statements.float()
    said = statements.sum(dim=1)
    # statements[j] . truths[i] counts the true statements; all of them true <=> it equals the count said
    true_count = truths @ statements.t()
    s = ((true_count >= said.unsqueeze(0) - 0.5) & (said.unsqueeze(0) > 0)).to(truths.dtype)
    return torch.maximum(s, torch.eye(truths.shape[0], device=truths.device, dtype=truths.dtype))


def unicl_targets(labels: torch.Tensor, statements: Optional[torch.Tensor] = None) -> torch.Tensor:
    """UniCL's target matrix S = clip(Y Y^T + I, 0, 1) for multi-hot labels Y (N, C).

    ``S[i, j] = 1`` when image i and text j share at least one label, or i == j (its own text).
    With ``statements`` (what each text says; ``labels`` then hold what each image shows) the
    targets are :func:`statement_targets` instead.
    """
    if statements is not None:
        return statement_targets(labels, statements)
    labels = labels.float()
    s = labels @ labels.t() + torch.eye(labels.shape[0], device=labels.device, dtype=labels.dtype)
    return s.clamp(0.0, 1.0)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against a row-stochastic target."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


def unicl_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
               logit_scale: Scale, statements: Optional[torch.Tensor] = None) -> torch.Tensor:
    """UniCL (paper 002): CLIP's loss with every text of a shared label counted as a positive.

    Targets come from :func:`unicl_targets`: row-normalised for image -> text, column-normalised
    for text -> image, and the loss is the soft cross-entropy in both directions, averaged over
    samples and the two directions. With all-distinct labels it reduces to :func:`clip_loss`.

    Parameters
    ----------
    image_features, text_features : Tensor
        (N, D) L2-normalised; row i is image i and the report text of the same sample.
    labels : Tensor
        (N, C) multi-hot (0/1) labels of the N samples; an all-zero row shares nothing.
    logit_scale : Tensor or float
        1/tau.
    """
    s = unicl_targets(labels, statements).to(image_features.dtype)
    logits = logit_scale * (image_features @ text_features.t())
    image_to_text = _soft_cross_entropy(logits, s / s.sum(dim=1, keepdim=True))
    text_to_image = _soft_cross_entropy(logits.t(), (s / s.sum(dim=0, keepdim=True)).t())
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def prototype_unicl_loss(image_features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                         logit_scale: Scale) -> torch.Tensor:
    """UniCL between images and learnable class prototypes (the image-label half of DLILP).

    The "texts" are the C class prototypes (L2-normalised here), so the target matrix is the
    labels themselves, S = Y (N, C): there is no per-sample own text, hence no "+ I" term.
    Image -> prototype uses the rows of Y normalised to sum 1 (images without any label are left
    out); prototype -> image uses the columns normalised to sum 1 over the batch (classes absent
    from the batch are left out). The two directions are averaged.

    Parameters
    ----------
    image_features : Tensor
        (N, D) L2-normalised image embeddings of the image-label head.
    prototypes : Tensor
        (C, D) class prototypes, any norm.
    labels : Tensor
        (N, C) multi-hot labels.
    logit_scale : Tensor or float
        1/tau of the image-label space.
    """
    labels = labels.to(image_features.dtype)
    logits = logit_scale * (image_features @ F.normalize(prototypes, dim=-1).t())
    row_sum = labels.sum(dim=1)
    col_sum = labels.sum(dim=0)
    has_label = row_sum > 0
    has_image = col_sum > 0
    zero = logits.sum() * 0.0
    if not bool(has_label.any()):
        return zero
    image_to_class = _soft_cross_entropy(logits[has_label], labels[has_label] / row_sum[has_label, None]).mean()
    class_to_image = _soft_cross_entropy(logits.t()[has_image], (labels / col_sum.clamp_min(1)).t()[has_image]).mean()
    return 0.5 * (image_to_class + class_to_image)


def dlilp_loss(label_features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
               text_image_features: torch.Tensor, text_features: torch.Tensor, has_text: torch.Tensor,
               label_logit_scale: Scale, text_logit_scale: Scale, *, text_weight: float = 0.1) -> torch.Tensor:
    """DLILP (paper 002): image-label UniCL against prototypes + ``text_weight`` x CLIP on image-text pairs.

    Two image heads share one image encoder: ``label_features`` (image-label head) are aligned
    with the class ``prototypes`` by :func:`prototype_unicl_loss`; ``text_image_features``
    (image-text head) are aligned with the report ``text_features`` by :func:`clip_loss`, over
    the samples with ``has_text`` only (a sample with labels but no report adds nothing there).
    Zero-shot classification of the known classes then uses the prototypes.

    Parameters
    ----------
    label_features, text_image_features, text_features : Tensor
        (N, D) L2-normalised. Rows of ``text_features`` where ``has_text`` is False are ignored.
    prototypes : Tensor
        (C, D) learnable class prototypes.
    labels : Tensor
        (N, C) multi-hot labels.
    has_text : Tensor
        (N,) bool, whether sample i has a report.
    label_logit_scale, text_logit_scale : Tensor or float
        The two heads' own 1/tau.
    text_weight : float, optional
        lambda, weight of the image-text term (default 0.1, paper 002).
    """
    label_term = prototype_unicl_loss(label_features, prototypes, labels, label_logit_scale)
    mask = has_text.to(torch.bool)
    text_term = clip_loss(text_image_features[mask], text_features[mask], text_logit_scale)
    return label_term + text_weight * text_term
