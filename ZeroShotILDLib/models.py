"""Model registry and the one loader every caller goes through.

A model name resolves to a record in ``model_list.json`` (architecture, weight source,
preprocessing), in the manner of open_clip's factory: random init, local files, local folders
and DAPT checkpoints written by ``training/`` all load through :func:`load_model`.

Checkpoints are untrusted input: torch files are read with ``weights_only=True`` and our own
checkpoints are safetensors whose JSON metadata says which architecture they belong to.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import InputError

log = logging.getLogger(__name__)

WEIGHTS_ENV = "ZEROSHOT_ILD_WEIGHTS"
CHECKPOINT_FORMAT = "zeroshot-ild-checkpoint/1"
METADATA_KEY = "zeroshot_ild"
_PACKAGE_DIR = Path(__file__).resolve().parent
_MODEL_LIST = _PACKAGE_DIR / "model_list.json"
_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
_PACKAGE_WEIGHTS = _PACKAGE_DIR / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry: what to build, where its weights come from, how to preprocess."""

    name: str
    architecture: str
    quick_gelu: bool
    source: str  # "file" | "local-dir" | "package" | "random" | "checkpoint"
    files: tuple[str, ...] = ()
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    description: str = ""
    licence: str = ""
    sha256: Optional[str] = None
    how_to_obtain: str = ""
    #: "phantoms" for models that never saw a real CT: their scores on a real scan are meaningless.
    trained_on: str = ""
    model_cfg: Optional[dict] = field(default=None, compare=False, hash=False)

    @property
    def meaningful(self) -> bool:
        """False for random-weight models whose scores say nothing about the scan."""
        return self.source != "random"


@lru_cache(maxsize=None)
def _register_configs() -> None:
    import open_clip

    for path in sorted(_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)


@lru_cache(maxsize=1)
def _registry() -> dict[str, ModelSpec]:
    data = json.loads(_MODEL_LIST.read_text(encoding="utf-8"))
    specs = {}
    for entry in data["models"]:
        entry = dict(entry)
        for key in ("files", "image_mean", "image_std"):
            entry[key] = tuple(entry.get(key) or ())
        specs[entry["name"]] = ModelSpec(**entry)
    return specs


def list_models() -> list[ModelSpec]:
    return list(_registry().values())


def model_names() -> list[str]:
    return list(_registry())


def get_spec(name: str) -> ModelSpec:
    try:
        return _registry()[name]
    except KeyError:
        raise InputError(
            f"unknown model '{name}': use one of {', '.join(model_names())}, dapt:<checkpoint> or a checkpoint path"
        ) from None


def default_weights_dir() -> Path:
    """The user cache folder for weights: $ZEROSHOT_ILD_WEIGHTS, else $XDG_CACHE_HOME/zeroshot-ild/weights."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "zeroshot-ild" / "weights"


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(device)


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

    The file is written next to its destination and renamed into place, so a crash never leaves a
    half-written checkpoint under the final name.
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
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def _model_cfg(architecture: str) -> Optional[dict]:
    import open_clip

    _register_configs()
    if architecture.startswith(("hf-hub:", "local-dir:")):
        return None
    return open_clip.get_model_config(architecture)


def spec_from_checkpoint(path: os.PathLike) -> ModelSpec:
    """A ModelSpec for one of our (DAPT) checkpoints, read from its metadata."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: check the path")
    meta = read_checkpoint_metadata(path)
    if meta is None:
        raise InputError(
            f"checkpoint {path.name} carries no ZeroShotILD metadata: load it with --model NAME --checkpoint {path.name}"
        )
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint {path.name} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}: re-export it")
    return ModelSpec(
        name=f"dapt:{path}",
        architecture=meta["architecture"],
        quick_gelu=bool(meta.get("quick_gelu", False)),
        source="checkpoint",
        files=(str(path),),
        image_mean=tuple(meta.get("image_mean", ModelSpec.image_mean)),
        image_std=tuple(meta.get("image_std", ModelSpec.image_std)),
        interpolation=meta.get("interpolation", "bicubic"),
        description=f"DAPT checkpoint based on {meta.get('base_model', '?')}",
        model_cfg=meta.get("model_cfg"),
    )


def _find_weights(spec: ModelSpec, weights_dir: Path) -> Path:
    roots = [_PACKAGE_WEIGHTS] if spec.source == "package" else [weights_dir]
    for pattern in spec.files:
        for root in roots:
            hits = sorted(glob.glob(str(root / pattern)))
            if hits:
                return Path(hits[0])
    where = roots[0] / (spec.files[0] if spec.files else spec.name)
    raise InputError(
        f"weights for '{spec.name}' not found at {where}: " + spec.how_to_obtain.format(weights_dir=weights_dir)
    )


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
        """What decides the embeddings: name plus the checkpoint's path, size and mtime (cache key)."""
        if self.checkpoint is None:
            return self.spec.name
        stat = self.checkpoint.stat()
        return f"{self.spec.name}|{self.checkpoint.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"

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
    overrides where a registry model's weights come from (e.g. a manually downloaded file).
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
        if ckpt is not None and ckpt.is_file():
            _check_architecture(spec, ckpt)
    torch_device = select_device(device)
    if spec.architecture.startswith("hf-hub:") or spec.source == "local-dir":
        model, tokenizer = _build_local_dir(spec, ckpt)
    else:
        model, tokenizer = _build(spec)
        if ckpt is not None:
            _load_weights(model, ckpt, spec)
    model = model.to(torch_device)
    return LoadedModel(spec, model, tokenizer, torch_device, ckpt if ckpt is not None and ckpt.is_file() else None)


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
        # A checkpoint of an architecture this install does not know by name: build from its config.
        cfg = dict(spec.model_cfg)
        cfg.pop("custom_text", None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.CLIP(**cfg)
        context = cfg.get("text_cfg", {}).get("context_length", 77)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
        return model, tokenizer
    if open_clip.get_model_config(arch) is None:
        raise InputError(f"architecture '{arch}' is unknown to open_clip {open_clip.__version__}: upgrade open_clip_torch")
    # Random-weight models are seeded so that two runs (and the tests) see the same network.
    with torch.random.fork_rng(devices=[]), _quiet_root_logger():
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
    return model, open_clip.get_tokenizer(arch)


class _quiet_root_logger:
    """open_clip warns on the root logger that no weights were loaded; we load them ourselves next."""

    def __enter__(self):
        self._logger = logging.getLogger()
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def _build_local_dir(spec: ModelSpec, folder: Optional[Path]):
    """BiomedCLIP and other hub models from a folder downloaded beforehand (offline hospitals)."""
    import open_clip

    if folder is None:
        raise InputError(f"'{spec.name}' needs a downloaded folder: " + spec.how_to_obtain)
    folder = folder if folder.is_dir() else folder.parent
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
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
