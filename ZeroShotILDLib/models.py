"""Model registry and the one loader every caller goes through.

A model name resolves to a record in ``model_list.json`` (architecture, weight source,
preprocessing), in the manner of open_clip's factory: random init, local files, local folders
and DAPT checkpoints written by ``training/`` all load through :func:`load_model`.

Checkpoints are untrusted input, their metadata included: torch files are read with
``weights_only=True``; our own checkpoints are safetensors whose JSON metadata says which
architecture they belong to, and that metadata is checked (allowed keys, types, sizes, finite
preprocessing, no pretrained/download flags) and the network it describes is counted on the
``meta`` device against the tensors in the file's header before anything is allocated. Loading
never reaches the network: the Hugging Face hub is switched offline around the load only, and
published weights are checked against the SHA-256 in ``model_list.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from .atomic_files import atomic_path
from .errors import InputError
from .file_hashes import sha256_file
# The registry itself is torch-free (the command line checks names and weights before importing
# torch); these names stay importable from here for every existing caller.
from .model_registry import (  # noqa: F401
    WEIGHTS_ENV, ModelSpec, _registry, default_weights_dir, find_weights, get_spec, list_models, model_names,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "zeroshot-ild-checkpoint/1"
METADATA_KEY = "zeroshot_ild"
_PACKAGE_DIR = Path(__file__).resolve().parent
_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
_PACKAGE_WEIGHTS = _PACKAGE_DIR / "weights"


@lru_cache(maxsize=None)
def _register_configs() -> None:
    import open_clip

    for path in sorted(_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)


def select_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. ``mps`` (Apple GPUs) only when asked for: it is not tested in
    CI (no Mac there), so it is never picked on its own. An explicit device that is absent is refused in one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu or auto")
    if device == "mps" and not _mps_available():
        raise InputError("device 'mps' was asked for but this torch has no Apple Metal (MPS) support or no Apple GPU: "
                         "use --device cpu or auto")
    return torch.device(device)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------
def read_checkpoint_metadata(path: os.PathLike) -> Optional[dict]:
    """Our metadata block from a safetensors checkpoint, or None for foreign files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise InputError(f"checkpoint {path.name} is corrupt or not a safetensors file ({_first_line(exc)}): download it again") from None
    if METADATA_KEY not in meta:
        return None
    try:
        return json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise InputError(f"checkpoint {path.name} has damaged metadata: re-export it with training/") from None


def save_checkpoint(path: os.PathLike, model: torch.nn.Module, spec: ModelSpec, extra: Optional[dict] = None) -> Path:
    """Write ``model`` as safetensors with the metadata :func:`load_model` needs to rebuild it.

    Written through ``atomic_files``, so a crash never leaves a half-written checkpoint under the
    final name.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "base_model": spec.name,
        "architecture": spec.architecture,
        "quick_gelu": spec.quick_gelu,
        "model_cfg": spec.model_cfg or _model_cfg(spec.architecture),
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
        "interpolation": spec.interpolation,
    }
    meta.update(extra or {})
    # safetensors refuses shared storage; clone so tied weights save as separate tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _model_cfg(architecture: str) -> Optional[dict]:
    import open_clip

    _register_configs()
    if architecture.startswith(("hf-hub:", "local-dir:")):
        return None
    return open_clip.get_model_config(architecture)


def spec_from_checkpoint(path: os.PathLike) -> ModelSpec:
    """A ModelSpec for one of our (DAPT) checkpoints, read from its metadata (checked, untrusted)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: check the path")
    meta = read_checkpoint_metadata(path)
    if meta is None:
        raise InputError(
            f"checkpoint {path.name} carries no ZeroShotILD metadata: load it with --model NAME --checkpoint {path.name}"
        )
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"checkpoint {path.name} has format {found!r}, expected {CHECKPOINT_FORMAT}: re-export it")
    where = f"checkpoint {path.name}"
    architecture = meta.get("architecture")
    if not isinstance(architecture, str) or not architecture or len(architecture) > 200:
        raise InputError(f"{where}: metadata field architecture is missing or not a name: re-export it with training/")
    if architecture.startswith(("hf-hub:", "local-dir:")) or "/" in architecture:
        raise InputError(f"{where} declares architecture {architecture[:80]!r}, which would be fetched from a hub or "
                         "folder: only open_clip's own architectures can be rebuilt from a checkpoint")
    quick_gelu = meta.get("quick_gelu", False)
    if not isinstance(quick_gelu, bool):
        raise InputError(f"{where}: metadata field quick_gelu must be true or false: re-export it with training/")
    interpolation = meta.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise InputError(f"{where}: interpolation {str(interpolation)[:40]!r} is not bicubic, bilinear or nearest")
    import open_clip

    _register_configs()
    model_cfg = meta.get("model_cfg")
    if open_clip.get_model_config(architecture) is not None:
        model_cfg = None  # a name open_clip knows is built from open_clip's own config, never the file's
    elif model_cfg is not None:
        model_cfg = validate_model_cfg(model_cfg, where)
    base = meta.get("base_model", "?")
    return ModelSpec(
        name=f"dapt:{path}",
        architecture=architecture,
        quick_gelu=quick_gelu,
        source="checkpoint",
        files=(str(path),),
        image_mean=_channel_values(meta.get("image_mean", ModelSpec.image_mean), "image_mean", where, positive=False),
        image_std=_channel_values(meta.get("image_std", ModelSpec.image_std), "image_std", where, positive=True),
        interpolation=interpolation,
        description=f"DAPT checkpoint based on {str(base)[:80]}",
        model_cfg=model_cfg,
    )


def _channel_values(values, name: str, where: str, *, positive: bool) -> tuple:
    """Per-channel mean or std: 1 or 3 finite numbers, std above zero (0 would divide every pixel by 0)."""
    ok = isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok:
        raise InputError(f"{where}: {name} must be 1 or 3 finite numbers: re-export it with training/")
    if positive and min(values) <= 0:
        raise InputError(f"{where}: {name} {min(values)} is not above 0 (every pixel would be divided by it): "
                         "re-export it with training/")
    if not positive and max(abs(v) for v in values) > 1e3:
        raise InputError(f"{where}: {name} {max(values, key=abs)} is far outside the [0, 1] pixel range: re-export it")
    values = tuple(float(v) for v in values)
    return values * 3 if len(values) == 1 else values


# ----------------------------------------------------------------------------------------------
# A checkpoint's model_cfg: what may be built from a file
# ----------------------------------------------------------------------------------------------
#: Bounds far above any CLIP in use (ViT-bigG-14: width 1664, 48 layers) and far below what
#: would exhaust memory or time just building the module tree.
_INT = {
    "embed_dim": (1, 8192), "layers": (1, 96), "width": (1, 8192), "head_width": (1, 1024), "heads": (1, 128),
    "patch_size": (1, 1024), "image_size": (8, 1024), "context_length": (1, 1024), "vocab_size": (1, 1_000_000),
    "attn_pooler_queries": (1, 1024), "attn_pooler_heads": (1, 128), "pad_id": (0, 1_000_000),
    "eos_id": (0, 1_000_000),
}
_FLOAT = {"mlp_ratio": (0.0, 16.0), "ls_init_value": (0.0, 10.0), "patch_dropout": (0.0, 1.0),
          "init_logit_scale": (-100.0, 100.0), "init_logit_bias": (-100.0, 100.0)}
_BOOL = {"quick_gelu", "custom_text", "attentional_pool", "no_ln_pre", "final_ln_after_pool", "output_tokens",
         "embed_cls", "no_causal_mask", "proj_bias", "qk_norm", "scaled_cosine_attn", "scale_heads",
         "scale_attn_inner", "scale_attn", "scale_fc"}
_CHOICES = {"pos_embed_type": {"learnable", "sin_cos_2d"}, "pool_type": {"tok", "avg", "none", "argmax", "first",
                                                                         "last", "eos"},
            "proj_type": {"linear", "none"}, "block_type": {"default", "custom"}}
_TOP_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text", "init_logit_scale",
             "init_logit_bias"}
_VISION_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
                "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre",
                "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens", "block_type", "qk_norm",
                "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value", "embed_cls",
              "pad_id", "eos_id", "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias", "proj_type",
              "output_tokens", "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
              "scale_attn", "scale_fc"}
#: Keys that fetch weights or whole towers from a hub (timm, Hugging Face): never from a checkpoint.
_DOWNLOAD_KEYS = {"timm_model_pretrained", "hf_model_pretrained", "pretrained", "pretrained_hf", "hf_model_name",
                  "hf_tokenizer_name", "timm_model_name", "tokenizer_mode", "tokenizer_kwargs", "load_pretrained"}
#: The most parameters a config may describe (ViT-bigG-14 has 2.5 billion).
MAX_PARAMETERS = 3_000_000_000


def validate_model_cfg(cfg, where: str = "checkpoint") -> dict:
    """Check a checkpoint's ``model_cfg`` before anything is built from it; return a clean copy.

    Only keys of open_clip's own ViT image and transformer text towers are allowed, each with its
    type and a sane range; a key that would fetch weights or a tower from a hub is refused whatever
    its value (a pretrained flag set to false is dropped). Raises ``InputError`` (one line).
    """
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: model_cfg is not an object: re-export it with training/")
    out = _check_section(cfg, _TOP_KEYS, "", where)
    for section, keys in (("vision_cfg", _VISION_KEYS), ("text_cfg", _TEXT_KEYS)):
        if not isinstance(cfg.get(section), dict):
            raise InputError(f"{where}: model_cfg.{section} is missing or not an object: re-export it with training/")
        out[section] = _check_section(cfg[section], keys, f"{section}.", where)
    if "embed_dim" not in out:
        raise InputError(f"{where}: model_cfg.embed_dim is missing: re-export it with training/")
    vision, text = out["vision_cfg"], out["text_cfg"]
    size = vision.get("image_size", 224)
    if (vision.get("patch_size") or 1) > (min(size) if isinstance(size, list) else size):
        raise InputError(f"{where}: model_cfg.vision_cfg.patch_size {vision.get('patch_size')} exceeds image_size {size}")
    if not isinstance(vision.get("layers"), list) and vision.get("width", 768) % vision.get("head_width", 64):
        raise InputError(f"{where}: model_cfg.vision_cfg.width is not a multiple of head_width")
    if text.get("width", 512) % text.get("heads", 8):
        raise InputError(f"{where}: model_cfg.text_cfg.width is not a multiple of heads")
    return out


def _check_section(section: dict, allowed: set, prefix: str, where: str) -> dict:
    out = {}
    for key, value in section.items():
        name = f"model_cfg.{prefix}{key}"
        if key in _DOWNLOAD_KEYS:
            if key.endswith("pretrained") and value is False:
                continue  # says "do not download": nothing to honour
            raise InputError(f"{where}: {name} would fetch weights or a model from a hub; a checkpoint may not reach "
                             "the network: remove the key and re-export it")
        if key in ("vision_cfg", "text_cfg") and not prefix:
            continue
        if key not in allowed:
            raise InputError(f"{where}: unknown key {name} in its metadata: re-export it with this version's training/")
        out[key] = _check_value(key, value, name, where)
    return out


def _check_value(key: str, value, name: str, where: str):
    if key in _BOOL:
        if not isinstance(value, bool):
            raise InputError(f"{where}: {name} must be true or false")
        return value
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise InputError(f"{where}: {name} {str(value)[:40]!r} is not one of {', '.join(sorted(_CHOICES[key]))}")
        return value
    if key in _FLOAT:
        if value is None and key in ("ls_init_value", "init_logit_bias"):
            return None
        lo, hi = _FLOAT[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise InputError(f"{where}: {name} must be a number in [{lo:g}, {hi:g}], got {str(value)[:40]}")
        return value
    lo, hi = _INT[key]
    if value is None and key == "patch_size":  # ResNet towers have no patches
        return None
    if key == "image_size" and isinstance(value, (list, tuple)) and len(value) == 2:
        return [_check_value(key, v, name, where) for v in value]
    if key == "layers" and isinstance(value, (list, tuple)) and len(value) == 4:  # ResNet stages
        return [_check_value(key, v, name, where) for v in value]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{where}: {name} must be a whole number in [{lo}, {hi}], got {str(value)[:40]}")
    return value


def _tensor_shapes(path: Path) -> Optional[dict]:
    """name -> shape of every tensor in a safetensors file, from its header alone (no data read)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k[7:] if k.startswith("module.") else k: tuple(handle.get_slice(k).get_shape())
                    for k in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise InputError(f"checkpoint {path.name} is corrupt or not a safetensors file ({_first_line(exc)}): "
                         "download it again") from None


def _effective_cfg(spec: ModelSpec) -> Optional[dict]:
    """The config ``_build`` will use: open_clip's own for a known name, else the checked model_cfg."""
    import open_clip

    known = open_clip.get_model_config(spec.architecture)
    if known is not None:
        cfg = json.loads(json.dumps(known))
        for section in ("vision_cfg", "text_cfg"):
            # A built-in config never downloads here either: the weights come from our file.
            for flag in ("timm_model_pretrained", "hf_model_pretrained"):
                if flag in cfg.get(section, {}):
                    cfg[section][flag] = False
        return cfg
    return dict(spec.model_cfg) if spec.model_cfg else None


def _build_clip(cfg: dict):
    import open_clip

    cfg = dict(cfg)
    custom_text = cfg.pop("custom_text", False)
    if custom_text or "hf_model_name" in cfg.get("text_cfg", {}):
        return open_clip.CustomTextCLIP(**cfg)
    return open_clip.CLIP(**cfg)


def check_parameters_against_file(spec: ModelSpec, ckpt: Path) -> None:
    """Refuse a checkpoint whose architecture does not match the tensors in its file, before allocating.

    The network is built on the ``meta`` device (shapes only, no memory), its parameter count
    compared with the cap and with the tensors listed in the safetensors header, and any missing
    or differently shaped tensor named. A 572-byte file describing a huge network stops here.
    """
    shapes = _tensor_shapes(ckpt)
    cfg = _effective_cfg(spec)
    if shapes is None or cfg is None:
        return
    where = f"checkpoint {ckpt.name}"
    try:
        with torch.device("meta"), _load_scope():
            expected = {k: tuple(v.shape) for k, v in _build_clip(cfg).state_dict().items()}
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to build from metadata is bad input
        raise InputError(f"{where}: its model configuration cannot be built ({_first_line(exc)}): re-export it") from None
    declared = sum(math.prod(s) for s in expected.values())
    present = sum(math.prod(s) for s in shapes.values())
    if declared > MAX_PARAMETERS:
        raise InputError(f"{where} describes a network of {declared / 1e9:.1f} billion parameters, above the "
                         f"{MAX_PARAMETERS / 1e9:.0f} billion this tool loads: refused")
    missing = [k for k in expected if k not in shapes]
    if missing or present < 0.98 * declared:
        first = f" (first missing: {missing[0]})" if missing else ""
        raise InputError(f"{where}: its architecture {spec.architecture} has {declared:,} parameters but the file holds "
                         f"{present:,}{first}: the metadata does not describe these weights; re-export it")
    # Position embeddings may be resized on load (open_clip.load_checkpoint); other shapes must agree.
    wrong = [k for k, s in expected.items() if shapes[k] != s and "positional_embedding" not in k]
    if wrong:
        raise InputError(f"{where}: tensor {wrong[0]} has shape {list(shapes[wrong[0]])}, the architecture "
                         f"{spec.architecture} needs {list(expected[wrong[0]])}: choose the matching --model")


def _find_weights(spec: ModelSpec, weights_dir: Path) -> Path:
    return find_weights(spec, weights_dir, _PACKAGE_WEIGHTS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
class LoadedModel:
    """A CLIP model in eval mode with its tokenizer and preprocessing."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, tokenizer, device: torch.device, checkpoint: Optional[Path]):
        self.spec = spec
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.checkpoint = checkpoint
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._mean = torch.tensor(spec.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.image_std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def identity(self) -> str:
        """What decides the embeddings (the embedding cache's key): architecture, preprocessing and
        the SHA-256 of the weights file, never its path or mtime (two files with one stat differ)."""
        if self.checkpoint is None:
            return self.spec.name
        return json.dumps({"architecture": self.spec.architecture, "quick_gelu": self.spec.quick_gelu,
                           "image_mean": list(self.spec.image_mean), "image_std": list(self.spec.image_std),
                           "weights_sha256": sha256_file(self.checkpoint)}, sort_keys=True)

    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        """(N,1,S,S) or (N,3,S,S) in [0,1] -> (N,3,S,S) normalised as the model was trained."""
        if pixels01.shape[1] == 1:
            pixels01 = pixels01.expand(-1, 3, -1, -1)
        mean = self._mean.to(pixels01.device)
        std = self._std.to(pixels01.device)
        return (pixels01 - mean) / std

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))


def load_model(name: str = "chexzero", checkpoint: Optional[str] = None, weights_dir: Optional[str] = None,
               device: str = "auto") -> LoadedModel:
    """Build a registry model (or a DAPT checkpoint) with its weights on ``device``.

    ``name`` is a registry name, ``dapt:<path>`` or a path to one of our checkpoints. ``checkpoint``
    overrides where a registry model's weights come from (e.g. a manually downloaded or fine-tuned
    file); such a file is not compared with the registry's published SHA-256, weights found in the
    weights folder (or shipped with the package) are.
    """
    _register_configs()
    weights_root = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    if name.startswith("dapt:") or (checkpoint is None and Path(name).suffix == ".safetensors"):
        path = Path(name[5:] if name.startswith("dapt:") else name).expanduser()
        spec = spec_from_checkpoint(path)
        ckpt: Optional[Path] = path
    else:
        spec = get_spec(name)
        if checkpoint:
            ckpt = Path(checkpoint).expanduser()
            if not ckpt.exists():
                raise InputError(f"checkpoint {ckpt} does not exist: check the path")
        elif spec.source == "random":
            ckpt = None
        else:
            ckpt = _find_weights(spec, weights_root)
            verify_published_hash(spec, ckpt)
        if ckpt is not None and ckpt.is_file():
            _check_architecture(spec, ckpt)
    torch_device = select_device(device)
    if spec.architecture.startswith("hf-hub:") or spec.source == "local-dir":
        model, tokenizer = _build_local_dir(spec, ckpt)
    else:
        if ckpt is not None and ckpt.is_file():
            check_parameters_against_file(spec, ckpt)
        model, tokenizer = _build(spec)
        if ckpt is not None:
            _load_weights(model, ckpt, spec)
    model = model.to(torch_device)
    return LoadedModel(spec, model, tokenizer, torch_device, ckpt if ckpt is not None and ckpt.is_file() else None)


def verify_published_hash(spec: ModelSpec, weights: Path) -> None:
    """Compare a weights file found for a registry model with the SHA-256 published for it.

    Files without a published hash (another CheXzero checkpoint, a ``.bin`` variant) load as they
    are. The hash is computed once per version of the file (``file_hashes``).
    """
    expected = spec.sha256.get(weights.name) if weights.is_file() else None
    if not expected:
        return
    found = sha256_file(weights)
    if found != expected.lower():
        raise InputError(
            f"weights {weights} have SHA-256 {found}, but '{spec.name}' publishes {expected.lower()} for "
            f"{weights.name}: the file is damaged or not the published one; download it again, or pass "
            f"--checkpoint {weights} to load it unchecked (e.g. your own fine-tuned weights)"
        )


_HUB_LOGGERS = ("open_clip", "huggingface_hub", "timm", "transformers", "urllib3")


class _DropLibraryRecords(logging.Filter):
    """Drops records that open_clip logs through the root logger (``logging.warning(...)``)."""

    def __init__(self, prefixes: tuple):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and record.pathname.startswith(self.prefixes))


@contextlib.contextmanager
def _load_scope():
    """Around one model load only: the Hugging Face hub offline, and open_clip/hub chatter quiet.

    Nothing outside the block changes: the environment, the hub's offline flag and the level of
    every logger are restored, and the root logger's level is never touched (Slicer's other
    modules log through it); open_clip's root-logger warnings are dropped by a filter instead.
    """
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # huggingface_hub reads the variable once at import time; its constant is switched as well.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    saved_hub = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    loggers = [logging.getLogger(n) for n in _HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    prefixes = tuple(str(Path(m.__file__).parent) for m in (sys.modules.get("open_clip"),) if m and m.__file__)
    root_filter = _DropLibraryRecords(prefixes)
    logging.getLogger().addFilter(root_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(root_filter)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_hub
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_architecture(spec: ModelSpec, ckpt: Path) -> None:
    """Refuse weights trained for another architecture, QuickGELU vs GELU above all.

    open_clip loads QuickGELU weights into a GELU model without complaint and the features come
    out silently wrong (open_clip issues #441, #771), so the flag is compared before loading.
    """
    meta = read_checkpoint_metadata(ckpt)
    sidecar = ckpt.parent / "open_clip_config.json"
    declared = None
    if meta is not None:
        declared = bool(meta.get("quick_gelu", False))
        arch = meta.get("architecture")
        if arch and _strip_quickgelu(arch) != _strip_quickgelu(spec.architecture):
            raise InputError(
                f"checkpoint {ckpt.name} is a {arch} model but '{spec.name}' is {spec.architecture}: choose the matching --model"
            )
    elif sidecar.is_file():
        try:
            declared = bool(json.loads(sidecar.read_text(encoding="utf-8")).get("model_cfg", {}).get("quick_gelu", False))
        except (json.JSONDecodeError, AttributeError):
            declared = None
    if declared is not None and declared != spec.quick_gelu:
        kind = "QuickGELU" if declared else "GELU"
        raise InputError(
            f"checkpoint {ckpt.name} was trained with {kind} but '{spec.name}' uses "
            f"{'QuickGELU' if spec.quick_gelu else 'GELU'}: its features would be silently wrong; choose the matching --model"
        )


def _strip_quickgelu(arch: str) -> str:
    return arch.replace("-quickgelu", "")


def _build(spec: ModelSpec):
    import open_clip

    arch = spec.architecture
    if open_clip.get_model_config(arch) is None and spec.model_cfg:
        # A checkpoint of an architecture this install does not know by name: build from its
        # config, checked by validate_model_cfg and counted against the file beforehand.
        cfg = dict(spec.model_cfg)
        with torch.random.fork_rng(devices=[]), _load_scope():
            torch.manual_seed(0)
            model = _build_clip(cfg)
        context = cfg.get("text_cfg", {}).get("context_length", 77)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
        return model, tokenizer
    if open_clip.get_model_config(arch) is None:
        raise InputError(f"architecture '{arch}' is unknown to open_clip {open_clip.__version__}: upgrade open_clip_torch")
    # Random-weight models are seeded so that two runs (and the tests) see the same network.
    with torch.random.fork_rng(devices=[]), _load_scope():
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
    return model, tokenizer


def _build_local_dir(spec: ModelSpec, folder: Optional[Path]):
    """BiomedCLIP and other hub models from a folder downloaded beforehand (offline hospitals)."""
    import open_clip

    if folder is None:
        raise InputError(f"'{spec.name}' needs a downloaded folder: " + spec.how_to_obtain)
    folder = folder if folder.is_dir() else folder.parent
    try:
        with _load_scope():
            model = open_clip.create_model(f"local-dir:{folder}", weights_only=True)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except ImportError as exc:
        raise InputError(f"'{spec.name}' needs an extra package ({_first_line(exc)}): pip install transformers") from None
    except Exception as exc:
        raise InputError(f"could not load '{spec.name}' from {folder} ({_first_line(exc)}): check the folder against the README") from None
    return model, tokenizer


def _load_weights(model: torch.nn.Module, ckpt: Path, spec: ModelSpec) -> None:
    import pickle

    import open_clip

    try:
        with _load_scope():
            open_clip.load_checkpoint(model, str(ckpt), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"checkpoint {ckpt.name} contains pickled Python objects, refused for safety ({_first_line(exc)}): "
            "convert it to a plain state dict or safetensors"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            raise InputError(
                f"checkpoint {ckpt.name} does not match architecture {spec.architecture} of '{spec.name}' "
                f"({_first_line(exc)}): choose the matching --model"
            ) from None
        raise InputError(f"checkpoint {ckpt.name} is corrupt or unreadable ({_first_line(exc)}): download it again") from None
    except InputError:
        raise
    except Exception as exc:  # zip/EOF/safetensors header errors from damaged files
        raise InputError(f"checkpoint {ckpt.name} is corrupt or unreadable ({_first_line(exc)}): download it again") from None
