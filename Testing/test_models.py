import json

import pytest
import torch

from ZeroShotILDLib import models
from ZeroShotILDLib.errors import InputError


class Payload:
    """Any class outside torch's weights-only allow-list stands in for a malicious pickle."""


def test_registry_has_the_papers_models():
    names = set(models.model_names())
    assert {"chexzero", "biomedclip", "clip-vit-b-32-laion", "clip-vit-b-16-laion", "openai-vit-b-32",
            "tiny-random", "phantom-demo"} <= names
    assert models.get_spec("chexzero").architecture == "ViT-B-32-quickgelu"
    assert models.get_spec("chexzero").image_mean == (0.39799,) * 3
    assert models.get_spec("clip-vit-b-32-laion").quick_gelu is False


def test_unknown_model_is_one_line_error():
    with pytest.raises(InputError) as err:
        models.get_spec("gpt-clip")
    assert "\n" not in str(err.value) and "chexzero" in str(err.value)


def test_missing_weights_say_what_to_download_and_where(tmp_path):
    with pytest.raises(InputError) as err:
        models.load_model("chexzero", weights_dir=str(tmp_path), device="cpu")
    msg = str(err.value)
    assert str(tmp_path / "chexzero") in msg and "CheXzero" in msg and "\n" not in msg


def test_weights_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.WEIGHTS_ENV, str(tmp_path))
    assert models.default_weights_dir() == tmp_path


def test_tiny_model_is_deterministic(tiny_model):
    again = models.load_model("tiny-random", device="cpu")
    for a, b in zip(tiny_model.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_round_trip_keeps_weights_and_metadata(tmp_path, tiny_model):
    path = models.save_checkpoint(tmp_path / "m.safetensors", tiny_model.model, tiny_model.spec,
                                  {"training": {"lr": 1e-4, "loss": "clip"}})
    meta = models.read_checkpoint_metadata(path)
    assert meta["architecture"] == "zsild-tiny" and meta["training"]["loss"] == "clip"
    loaded = models.load_model(f"dapt:{path}", device="cpu")
    assert loaded.spec.image_mean == tiny_model.spec.image_mean
    for k, v in tiny_model.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    # A plain path to one of our checkpoints works too.
    assert models.load_model(str(path), device="cpu").spec.architecture == "zsild-tiny"


def test_registry_model_from_a_user_file(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model.model.state_dict(), path)
    loaded = models.load_model("tiny-random", checkpoint=str(path), device="cpu")
    assert loaded.checkpoint == path


def test_pickled_objects_are_refused(tmp_path, tiny_model):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model.model.state_dict(), "obj": Payload()}, path)
    with pytest.raises(InputError, match="pickled|corrupt"):
        models.load_model("tiny-random", checkpoint=str(path), device="cpu")


def test_truncated_checkpoint_is_refused(tmp_path, tiny_model):
    path = tmp_path / "cut.safetensors"
    models.save_checkpoint(path, tiny_model.model, tiny_model.spec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt"):
        models.load_model("tiny-random", checkpoint=str(path), device="cpu")


def test_shape_mismatch_is_refused(tmp_path, tiny_model):
    state = tiny_model.model.state_dict()
    state["visual.conv1.weight"] = torch.zeros(8, 3, 16, 16)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match="does not match architecture"):
        models.load_model("tiny-random", checkpoint=str(path), device="cpu")


def test_quickgelu_weights_into_gelu_config_are_refused(tmp_path):
    # A checkpoint that declares QuickGELU (our metadata), offered to the GELU LAION ViT-B/32 entry.
    import open_clip

    gelu = models.get_spec("clip-vit-b-32-laion")
    quick = models.get_spec("openai-vit-b-32")
    model = open_clip.create_model("ViT-B-32-quickgelu")
    path = models.save_checkpoint(tmp_path / "openai.safetensors", model, quick)
    with pytest.raises(InputError, match="QuickGELU"):
        models.load_model(gelu.name, checkpoint=str(path), device="cpu")
    # The same holds for a foreign checkpoint with an open_clip_config.json beside it.
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}), encoding="utf-8")
    with pytest.raises(InputError, match="QuickGELU"):
        models.load_model(gelu.name, checkpoint=str(folder / "open_clip_pytorch_model.bin"), device="cpu")


def test_laion_file_layout_is_found_in_weights_dir(tmp_path, monkeypatch):
    import open_clip

    model = open_clip.create_model("ViT-B-32")
    folder = tmp_path / "clip-vit-b-32-laion"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    # Random weights are not the published file: found, then refused by the SHA-256 check...
    with pytest.raises(InputError, match="SHA-256.*download it again.*--checkpoint") as err:
        models.load_model("clip-vit-b-32-laion", weights_dir=str(tmp_path), device="cpu")
    assert "\n" not in str(err.value)
    # ... and loaded when the registry's hash is this file's (as for the real download).
    from ZeroShotILDLib.file_hashes import sha256_file

    spec = models.get_spec("clip-vit-b-32-laion")
    monkeypatch.setitem(spec.sha256, "open_clip_model.safetensors", sha256_file(folder / "open_clip_model.safetensors"))
    loaded = models.load_model("clip-vit-b-32-laion", weights_dir=str(tmp_path), device="cpu")
    assert loaded.checkpoint.name == "open_clip_model.safetensors"
    assert torch.equal(loaded.model.visual.conv1.weight, model.visual.conv1.weight)


def test_cuda_refused_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA"):
        models.select_device("cuda")
    assert models.select_device("auto").type == "cpu"
