"""Model loading: checkpoints, local-dir:, hf-hub:, and fast, clear failures without a network."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from fps_cli.errors import FileFormatError, ModelError
from fps_cli.formats import Mask, load_mask, read_mask, save_mask
from fps_cli.models import ModelSpec, create_model


def tiny(**kw):
    return create_model(ModelSpec("test_vit", pretrained=False, img_size=32, **kw))


def test_checkpoint_safetensors_and_torch_with_new_head(tmp_path):
    source = tiny(num_classes=10)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        loaded = create_model(ModelSpec("test_vit", checkpoint=path, img_size=32, num_classes=4))
        assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
        assert loaded.head.weight.shape == (4, 64)  # a head of another size is left new
        same_head = create_model(ModelSpec("test_vit", checkpoint=path, img_size=32, num_classes=10))
        assert torch.equal(same_head.head.weight, source.head.weight)


def test_checkpoint_that_does_not_fit_lists_every_problem(tmp_path):
    state = dict(tiny().state_dict())
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.1.mlp.fc1.bias"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ModelError) as e:
        create_model(ModelSpec("test_vit", checkpoint=tmp_path / "bad.safetensors", img_size=32))
    lines = str(e.value).splitlines()
    # The two sides with their sizes first, then every kind of problem on its own line.
    assert lines[0] == f"checkpoint {tmp_path / 'bad.safetensors'} does not fit the model:"
    assert lines[1].startswith(f"  checkpoint  {len(state)} tensors, ")
    assert lines[2].startswith("  model       test_vit, ") and lines[2].endswith(" parameters")
    assert lines[3:] == [
        "  1 tensor the model lacks: extra.weight",
        "  1 model tensor the checkpoint lacks: blocks.1.mlp.fc1.bias",
        "  1 shape mismatch (checkpoint vs model): blocks.0.attn.qkv.weight [3, 3] vs [192, 64]",
    ]


def test_checkpoint_torch_file_is_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        create_model(ModelSpec("test_vit", checkpoint=tmp_path / "evil.pth", img_size=32))
    with pytest.raises(ModelError, match="does not exist"):
        create_model(ModelSpec("test_vit", checkpoint=tmp_path / "missing.pth"))


def test_local_dir_model(tmp_path):
    source = tiny(num_classes=3)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(dict(source.state_dict()), folder / "model.safetensors")
    config = {
        "architecture": "test_vit",
        "num_classes": 3,
        "pretrained_cfg": {"input_size": [3, 32, 32]},
        "model_args": {"img_size": 32},
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = create_model(ModelSpec(f"local-dir:{folder}", img_size=32))
    assert torch.equal(loaded.head.weight, source.head.weight)
    with pytest.raises(ModelError, match=r"has no config\.json"):
        create_model(ModelSpec(f"local-dir:{tmp_path / 'nothing'}"))


def test_hf_hub_model_without_network_fails_at_once():
    with pytest.raises(ModelError, match=r"cannot download the model config for hf-hub:timm/test_vit\.r160_in1k"):
        create_model(ModelSpec("hf-hub:timm/test_vit.r160_in1k"))
    with pytest.raises(ModelError, match="offline mode"):
        create_model(ModelSpec("hf-hub:timm/test_vit.r160_in1k", offline=True))


def test_cached_pretrained_weights_load_without_network(tmp_path, monkeypatch):
    """Weights already in the HF cache load with the hub offline (no HTTP request, no retry loop)."""
    from huggingface_hub import constants

    source = timm.create_model("test_vit.r160_in1k", pretrained=False)
    snapshot = tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(dict(source.state_dict()), snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = create_model(ModelSpec("test_vit.r160_in1k"))
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert constants.HF_HUB_OFFLINE is False  # restored after loading


def test_img_size_refused_by_a_model_without_it():
    with pytest.raises(ModelError, match="does not accept --img-size"):
        create_model(ModelSpec("resnet10t", pretrained=False, img_size=32))


def test_load_mask_dense_matches_indices(tmp_path):
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "norm.weight": (4,)}
    mask = Mask({"a.weight": torch.tensor([0, 5, 11])}, ["a.bias"], shapes, {"model": "x"})
    save_mask(tmp_path / "m.safetensors", mask)
    dense = load_mask(tmp_path / "m.safetensors")
    assert dense.keys() == shapes.keys()
    assert dense["a.weight"].dtype == torch.bool and dense["a.weight"].shape == (3, 4)
    assert dense["a.weight"].reshape(-1).nonzero().squeeze(1).tolist() == [0, 5, 11]
    assert bool(dense["a.bias"].all()) and not bool(dense["norm.weight"].any())


def test_mask_readable_with_safetensors_alone(tmp_path):
    """The documented recipe: numpy + safetensors, no fps_cli."""
    import numpy as np
    from safetensors import safe_open

    mask = Mask({"a.weight": torch.tensor([1, 2])}, ["a.bias"], {"a.weight": (2, 2), "a.bias": (2,)})
    save_mask(tmp_path / "m.safetensors", mask)
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        shapes = json.loads(meta["fps.param_shapes"])
        dense = np.zeros(np.prod(shapes["a.weight"]), dtype=bool)
        dense[f.get_tensor("a.weight")] = True
    assert meta["fps.format"] == "mask" and meta["fps.format_version"] == "1"
    assert dense.reshape(shapes["a.weight"]).tolist() == [[False, True], [True, False]]
    assert json.loads(meta["fps.fully_trainable"]) == ["a.bias"]


def test_mask_validation_reports_every_problem(tmp_path):
    save_file(
        {"a.weight": torch.tensor([3, 1], dtype=torch.int32), "ghost": torch.tensor([0], dtype=torch.int32)},
        tmp_path / "m.safetensors",
        metadata={
            "fps.format": "mask",
            "fps.format_version": "1",
            "fps.param_shapes": json.dumps({"a.weight": [2, 2]}),
            "fps.fully_trainable": '["b"]',
        },
    )
    with pytest.raises(FileFormatError) as e:
        read_mask(tmp_path / "m.safetensors")
    for fragment in ("'b' is not in the model", "'ghost' is not a parameter", "sorted, unique"):
        assert fragment in str(e.value)


def test_newer_format_version_is_refused(tmp_path):
    save_file({}, tmp_path / "m.safetensors", metadata={"fps.format": "mask", "fps.format_version": "2"})
    with pytest.raises(FileFormatError, match="upgrade fps-cli"):
        read_mask(tmp_path / "m.safetensors")
