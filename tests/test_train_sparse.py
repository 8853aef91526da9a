"""The sparse mechanism and the delta file: frozen base, trainable values only, memory that scales with the mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fps_cli import sparse
from fps_cli.finetune import TrainConfig, attach_delta, build_base, make_optimizer, optimizer_state_numel, run_train
from fps_cli.formats import Delta, read_delta, save_delta
from fps_cli.models import ModelSpec
from fps_cli.selector import SelectOptions, run_select

SPEC = ModelSpec("test_vit", pretrained=False, img_size=32)


@pytest.fixture
def mask_on(image_folder):
    """Factory: a 5% FPS mask of test_vit on a generated folder -> (mask, data folder)."""

    def make(**folder):
        data = image_folder(**folder)
        return run_select(SPEC, data, SelectOptions(budget=0.05), num_workers=0).mask, data

    return make


def _fresh_base(mask):
    return build_base(
        ModelSpec("test_vit", pretrained=False, num_classes=mask.provenance["num_classes"], img_size=32),
        mask.shapes,
        mask.provenance,
        "mask",
    )


def test_training_changes_only_the_mask(mask_on):
    mask, data = mask_on(classes=3, per_class=4)
    config = TrainConfig(epochs=2, lr=1e-2, weight_decay=0.05, warmup_epochs=0, batch_size=4, seed=0)
    result = run_train(mask, config, data_dir=data, num_workers=0)
    trained, base = result.model.cpu(), _fresh_base(mask)
    base_params = dict(base.named_parameters())

    effective = {}
    for name in base_params:
        module_name, _, attr = name.rpartition(".")
        module = trained.get_submodule(module_name)
        effective[name] = getattr(module, attr).detach()
        if name in mask.indices:  # the frozen original inside the parametrization is untouched
            original = module.parametrizations[attr].original
            assert not original.requires_grad
            assert torch.equal(original, base_params[name])

    for name, before in base_params.items():
        after = effective[name]
        if name in mask.fully_trainable:
            assert not torch.equal(after, before), f"{name} did not move"
        elif name in mask.indices:
            keep = torch.ones(before.numel(), dtype=torch.bool)
            keep[mask.indices[name]] = False
            assert torch.equal(after.reshape(-1)[keep], before.reshape(-1)[keep]), f"{name} moved outside the mask"
            moved = after.reshape(-1)[mask.indices[name]] != before.reshape(-1)[mask.indices[name]]
            assert bool(moved.all()), f"{name}: {int((~moved).sum())} selected entries did not move"
        else:
            assert torch.equal(after, before), f"frozen {name} changed"
    head = trained.get_classifier()
    assert not torch.equal(head.weight.detach(), base.get_classifier().weight)

    # AdamW keeps exp_avg and exp_avg_sq for each trainable element (2 slots), plus one step counter per tensor.
    elements, scalars = result.optimizer_state
    assert elements == 2 * mask.trainable
    assert scalars == len(mask.indices) + len(mask.fully_trainable)


def test_only_trainable_values_reach_the_optimizer(mask_on):
    mask, _ = mask_on(classes=3, per_class=2)
    model = _fresh_base(mask)
    params = sparse.attach(model, mask.indices, mask.fully_trainable)
    requires = {n for n, p in model.named_parameters() if p.requires_grad}
    assert requires == {f"{n.rpartition('.')[0]}.parametrizations.weight.0.delta" for n in mask.indices} | set(
        mask.fully_trainable
    )
    assert all(d.delta.dim() == 1 and d.delta.numel() == mask.indices[n].numel() for n, d in params.deltas.items())
    assert params.numel == mask.trainable

    for kind, slots in (("sgd", 1), ("adamw", 2)):
        optimizer = make_optimizer(params, TrainConfig(optimizer=kind))
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == mask.trainable
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        # No dense gradient of a masked weight is kept: only the 1-D deltas and the full tensors hold gradients.
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert optimizer_state_numel(optimizer)[0] == slots * mask.trainable


def test_forward_hooks_and_detach(tiny_mlp):
    indices = {"fc1.weight": torch.tensor([0, 7, 29]), "fc2.weight": torch.tensor([3])}
    before = {k: v.clone() for k, v in tiny_mlp.state_dict().items()}
    params = sparse.attach(tiny_mlp, indices, ["head.weight", "head.bias"])
    seen = []
    handle = tiny_mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        tiny_mlp(torch.randn(4, 6))
    finally:
        handle.remove()
    assert seen == [torch.Size([4, 5])]

    with torch.no_grad():
        params.deltas["fc1.weight"].delta.fill_(1.0)
    w = tiny_mlp.fc1.weight.reshape(-1)
    assert torch.equal(w[indices["fc1.weight"]], before["fc1.weight"].reshape(-1)[indices["fc1.weight"]] + 1)
    sparse.detach(tiny_mlp, params)
    assert type(tiny_mlp.fc1) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in tiny_mlp.state_dict().items())


def test_recompute_gives_the_same_gradients(tiny_mlp):
    indices = {"fc1.weight": torch.tensor([1, 2, 3, 20]), "fc2.weight": torch.tensor([0, 19])}
    params = sparse.attach(tiny_mlp, indices, ["head.weight"])
    with torch.no_grad():
        for d in params.deltas.values():
            d.delta.normal_()
    x = torch.randn(8, 6)
    grads = []
    for recompute in (False, True):
        with sparse.recompute_sparse_weights() if recompute else torch.enable_grad():
            out = tiny_mlp(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in params.parameters()])
        for p in params.parameters():
            p.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_delta_round_trip_and_logits_on_a_fresh_base(mask_on, tmp_path):
    mask, data = mask_on(classes=3, per_class=3)
    result = run_train(mask, TrainConfig(epochs=1, lr=1e-2, batch_size=4), data_dir=data, num_workers=0)
    x = torch.randn(3, 3, 32, 32)
    trained = result.model.cpu().eval()
    with torch.no_grad():
        expected = trained(x)

    path = tmp_path / "delta.safetensors"
    save_delta(path, result.delta)
    loaded = read_delta(path)
    assert loaded.indices.keys() == result.delta.indices.keys()
    for name in loaded.indices:
        assert torch.equal(loaded.indices[name], result.delta.indices[name])
        assert torch.equal(loaded.values[name], result.delta.values[name])
        assert loaded.values[name].dtype == torch.float32
    assert all(torch.equal(loaded.full[n], v) for n, v in result.delta.full.items())
    assert loaded.provenance["train_config"]["epochs"] == 1
    assert loaded.provenance["base_sha256"] == mask.provenance["base_sha256"]
    assert loaded.provenance["metrics"] == result.metrics

    fresh = _fresh_base(mask)
    base_state = {k: v.clone() for k, v in fresh.named_parameters()}
    attach_delta(fresh, loaded)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)

    # The pure merge gives a plain model with the same outputs.
    plain = _fresh_base(mask)
    merged = sparse.apply_delta(base_state, loaded.indices, loaded.values, loaded.full)
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), expected)


def test_read_delta_reports_every_problem(tmp_path):
    from fps_cli.errors import FileFormatError

    shapes = {"a.weight": (2, 3), "head.weight": (2, 2)}
    values = {"a.weight": torch.tensor([0.5, -0.5])}
    good = Delta({"a.weight": torch.tensor([1, 4])}, values, {"head.weight": torch.ones(2, 2)}, shapes)
    path = tmp_path / "d.safetensors"
    save_delta(path, good)
    assert read_delta(path).values["a.weight"].tolist() == [0.5, -0.5]

    bad = Delta({"a.weight": torch.tensor([4, 1])}, {"a.weight": torch.tensor([0.5, -0.5])}, {}, shapes)
    save_delta(path, bad, overwrite=True)
    with pytest.raises(FileFormatError, match=r"indices of 'a.weight' must be sorted"):
        read_delta(path)
