"""Checkpoints are untrusted input, metadata included: hostile files are refused in one line,
before anything large is built, without any network access; loading changes no process state."""
import json
import logging
import os
import resource
import socket

import pytest
import torch

from ZeroShotILDLib import file_hashes, models
from ZeroShotILDLib.errors import InputError

TINY_CFG = json.loads((models._CONFIG_DIR / "zsild-tiny.json").read_text(encoding="utf-8"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and is recorded)."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a))
    return attempts


def hostile(tmp_path, name="evil.safetensors", tensors=None, **meta_overrides):
    """A safetensors file with our metadata block; tensors default to a single scalar."""
    from safetensors.torch import save_file

    meta = {"format": models.CHECKPOINT_FORMAT, "base_model": "tiny-random", "architecture": "zsild-evil",
            "quick_gelu": True, "model_cfg": json.loads(json.dumps(TINY_CFG)), "image_mean": [0.5] * 3,
            "image_std": [0.25] * 3, "interpolation": "bicubic"}
    meta.update(meta_overrides)
    path = tmp_path / name
    save_file(tensors if tensors is not None else {"x": torch.zeros(1)}, str(path),
              metadata={models.METADATA_KEY: json.dumps(meta)})
    return path


def refused(path, match):
    with pytest.raises(InputError, match=match) as err:
        models.load_model(f"dapt:{path}", device="cpu")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unknown_model_cfg_key_is_one_line_not_type_error(tmp_path, no_network):
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"]["evil_flag"] = 1
    msg = refused(hostile(tmp_path, model_cfg=cfg), "unknown key model_cfg.vision_cfg.evil_flag")
    cfg = dict(TINY_CFG, surprise=True)
    refused(hostile(tmp_path, "b.safetensors", model_cfg=cfg), "unknown key model_cfg.surprise")
    assert "re-export" in msg


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "timm_model_pretrained", True),
    ("text_cfg", "hf_model_pretrained", True),
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
    ("text_cfg", "hf_model_name", "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"),
    ("text_cfg", "hf_tokenizer_name", "bert-base-uncased"),
])
def test_download_flags_are_refused_without_network(tmp_path, no_network, section, key, value):
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg[section][key] = value
    refused(hostile(tmp_path, model_cfg=cfg), f"{key} would fetch .* may not reach the network")
    assert no_network == []


def test_pretrained_flag_set_to_false_is_harmless(tmp_path, tiny_model, no_network):
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    spec = models.ModelSpec(**{**tiny_model.spec.__dict__, "model_cfg": cfg, "architecture": "zsild-renamed"})
    path = models.save_checkpoint(tmp_path / "ok.safetensors", tiny_model.model, spec)
    loaded = models.load_model(f"dapt:{path}", device="cpu")
    assert torch.equal(loaded.model.visual.conv1.weight, tiny_model.model.visual.conv1.weight)


@pytest.mark.parametrize("width,layers,match", [
    (2048, 12, "1,320,077,313 parameters but the file holds 1 "),  # about 5 GB of float32
    (4096, 48, "19.6 billion parameters, above the 3 billion")])
def test_small_file_describing_a_huge_network_is_refused_before_allocating(tmp_path, no_network, width, layers, match):
    cfg = {"embed_dim": width, "quick_gelu": True,
           "vision_cfg": {"image_size": 224, "layers": layers, "width": width, "head_width": 64, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 64, "layers": layers}}
    path = hostile(tmp_path, model_cfg=cfg)
    assert path.stat().st_size < 1024  # the file was 572 bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    msg = refused(path, match)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB"
    assert "re-export" in msg or "refused" in msg


def test_known_huge_architecture_name_is_counted_too(tmp_path, no_network):
    """A known open_clip name (ViT-bigG-14, 2.5 B parameters) in a tiny file: refused by the count."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(hostile(tmp_path, architecture="ViT-bigG-14", quick_gelu=False, model_cfg=None), "parameters but the file")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200


def test_open_clip_own_configs_pass_unless_they_name_hub_towers():
    """Every built-in ViT/ResNet + transformer config is accepted, so real DAPT checkpoints load."""
    import open_clip

    models._register_configs()
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        hub = any(k in cfg.get(s, {}) for s in ("vision_cfg", "text_cfg")
                  for k in ("timm_model_name", "hf_model_name", "hf_tokenizer_name")) or "multimodal_cfg" in cfg
        if not hub:
            models.validate_model_cfg(cfg, name)


def test_known_architecture_ignores_the_files_model_cfg(tmp_path, tiny_model):
    """A name open_clip knows is built from open_clip's config; the file's model_cfg is never used."""
    cfg = dict(TINY_CFG, vision_cfg=dict(TINY_CFG["vision_cfg"], timm_model_name="anything"))
    spec = models.ModelSpec(**{**tiny_model.spec.__dict__, "model_cfg": cfg})
    path = models.save_checkpoint(tmp_path / "m.safetensors", tiny_model.model, spec)
    assert models.spec_from_checkpoint(path).model_cfg is None
    models.load_model(f"dapt:{path}", device="cpu")


@pytest.mark.parametrize("section,key,value,match", [
    ("vision_cfg", "layers", 10_000, "whole number in"),
    ("vision_cfg", "width", -1, "whole number in"),
    ("text_cfg", "context_length", 10**9, "whole number in"),
    ("text_cfg", "vocab_size", "49408", "whole number in"),
    ("text_cfg", "heads", 3, "not a multiple of heads"),
    ("vision_cfg", "mlp_ratio", float("nan"), "number in"),
    ("vision_cfg", "patch_size", 512, "exceeds image_size"),
])
def test_sizes_and_types_are_bounded(tmp_path, section, key, value, match):
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg[section][key] = value
    refused(hostile(tmp_path, model_cfg=cfg), match)


@pytest.mark.parametrize("field,value,match", [
    ("image_std", [0.0, 0.0, 0.0], "image_std 0.0 is not above 0"),
    ("image_std", [0.25, -1, 0.25], "not above 0"),
    ("image_mean", [float("nan")] * 3, "finite numbers"),
    ("image_std", "wide", "finite numbers"),
    ("quick_gelu", "yes", "quick_gelu must be true or false"),
    ("architecture", "hf-hub:evil/model", "only open_clip's own architectures"),
])
def test_preprocessing_and_architecture_metadata_are_checked(tmp_path, field, value, match):
    refused(hostile(tmp_path, **{field: value}), match)


def test_tensor_shapes_are_compared_with_the_declared_architecture(tmp_path, tiny_model):
    tensors = {k: v.contiguous().clone() for k, v in tiny_model.model.state_dict().items()}
    tensors["visual.conv1.weight"] = torch.zeros(64, 3, 8, 8)
    refused(hostile(tmp_path, tensors=tensors, architecture="zsild-tiny"), "visual.conv1.weight has shape")


class Payload:
    """Any class outside torch's weights-only allow-list stands in for a malicious pickle."""


def test_pickle_checkpoint_is_refused_without_network(tmp_path, tiny_model, no_network):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model.model.state_dict(), "obj": Payload()}, path)
    with pytest.raises(InputError, match="pickled|corrupt"):
        models.load_model("tiny-random", checkpoint=str(path), device="cpu")


# ----------------------------------------------------------------------------------------------
# Process state: the environment and the root logger are the host application's
# ----------------------------------------------------------------------------------------------
def test_loading_leaves_environment_and_loggers_unchanged(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    oc_logger = logging.getLogger("open_clip")
    monkeypatch.setattr(oc_logger, "level", logging.DEBUG)
    hub_before = hub_constants.HF_HUB_OFFLINE
    env_before = dict(os.environ)
    path = models.save_checkpoint(tmp_path / "m.safetensors", tiny_model.model, tiny_model.spec)
    models.load_model(f"dapt:{path}", device="cpu")
    models.load_model("vit-b-32-random", device="cpu")
    assert dict(os.environ) == env_before
    assert root.level == logging.INFO and oc_logger.level == logging.DEBUG
    assert root.filters == [] and hub_constants.HF_HUB_OFFLINE == hub_before


def test_hub_is_offline_during_the_load_only(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    root_level = logging.getLogger().level
    with models._load_scope():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.is_offline_mode()
        assert logging.getLogger().level == root_level  # Slicer's modules keep logging meanwhile
    assert "HF_HUB_OFFLINE" not in os.environ


def test_local_dir_model_loads_offline_without_touching_the_environment(tmp_path, tiny_model, monkeypatch,
                                                                        no_network):
    """The BiomedCLIP path (a downloaded open_clip folder) used to set HF_HUB_OFFLINE for good."""
    from safetensors.torch import save_file

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}), encoding="utf-8")
    save_file({k: v.contiguous().clone() for k, v in tiny_model.model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    env_before = dict(os.environ)
    loaded = models.load_model("biomedclip", checkpoint=str(folder), device="cpu")
    assert torch.equal(loaded.model.visual.conv1.weight, tiny_model.model.visual.conv1.weight)
    assert dict(os.environ) == env_before and no_network == []


def test_open_clip_root_warning_is_silenced_but_other_root_records_pass(caplog):
    with caplog.at_level(logging.WARNING), models._load_scope():
        models._build(models.get_spec("tiny-random"))  # open_clip: "No pretrained weights loaded"
        logging.warning("a Slicer module's own warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "a Slicer module's own warning" in messages
    assert not any("pretrained" in m for m in messages)


# ----------------------------------------------------------------------------------------------
# Published SHA-256
# ----------------------------------------------------------------------------------------------
def test_shipped_demo_weights_match_the_registry_hash():
    spec = models.get_spec("phantom-demo")
    weights = models._PACKAGE_WEIGHTS / "phantom_demo.safetensors"
    assert spec.sha256["phantom_demo.safetensors"] == file_hashes.sha256_file(weights)
    models.verify_published_hash(spec, weights)


def test_published_hashes_are_well_formed():
    for spec in models.list_models():
        for name, digest in spec.sha256.items():
            assert len(digest) == 64 and int(digest, 16) >= 0, (spec.name, name)
    assert models.get_spec("clip-vit-b-32-laion").sha256["open_clip_model.safetensors"].startswith("ac4f8c4b")


def test_damaged_published_weights_name_expected_and_found(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    folder.mkdir()
    weights = folder / "phantom_demo.safetensors"
    data = bytearray((models._PACKAGE_WEIGHTS / "phantom_demo.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: loads fine, silently different weights
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(models, "_PACKAGE_WEIGHTS", folder)
    spec = models.get_spec("phantom-demo")
    with pytest.raises(InputError) as err:
        models.load_model("phantom-demo", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and spec.sha256["phantom_demo.safetensors"] in msg
    assert file_hashes.sha256_file(weights) in msg and "--checkpoint" in msg
    # The documented escape hatch: an explicit --checkpoint is loaded unchecked.
    assert models.load_model("phantom-demo", checkpoint=str(weights), device="cpu").checkpoint == weights


# ----------------------------------------------------------------------------------------------
# Content hashes remembered by stat
# ----------------------------------------------------------------------------------------------
def test_hash_memo_never_confuses_files_with_one_stat(tmp_path, monkeypatch):
    monkeypatch.setenv(file_hashes.MEMO_ENV, str(tmp_path / "memo.json"))
    file_hashes.forget()
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * 1000)
    b.write_bytes(b"B" * 1000)
    for p in (a, b):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert file_hashes.sha256_file(a) != file_hashes.sha256_file(b)
    # Rewritten in place with its mtime restored: ctime still moves, so the hash is recomputed.
    old = file_hashes.sha256_file(a)
    a.write_bytes(b"C" * 1000)
    os.utime(a, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert file_hashes.sha256_file(a) != old
    # Remembered on disk: a new process (memory forgotten) reads the memo instead of hashing.
    file_hashes.flush()
    file_hashes.forget()
    calls = []
    real = file_hashes._hash_bytes  # the full read; a hit only re-hashes the first and last MiB (issue 25)
    monkeypatch.setattr(file_hashes, "_hash_bytes", lambda *x: calls.append(1) or real(*x))
    file_hashes.sha256_file(b)
    assert calls == []
