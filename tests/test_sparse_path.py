"""The sparse path of masked Linear layers: the delta's gradient at the selected entries only, no dense weight."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import TinyMLP
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fps_cli import sparse
from fps_cli.finetune import TrainConfig, make_optimizer


def _random_indices(model: nn.Module, per_row: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``per_row`` random entries in every row of every Linear weight except the head's."""
    indices = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not model.get_classifier():
            out, fan_in = module.weight.shape
            cols = torch.stack([torch.randperm(fan_in, generator=generator)[:per_row] for _ in range(out)])
            flat = (torch.arange(out)[:, None] * fan_in + cols).reshape(-1)
            indices[f"{name}.weight"] = flat.sort().values
    return indices


def _vit() -> nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)


def _gradients(model, indices, full, x, path, values):
    """Loss gradients of every trainable tensor (and of the input) with the deltas attached on ``path``."""
    params = sparse.attach(model, indices, full, values=values, path=path)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters()}
    grads["input"] = x.grad.clone()
    for p in params.parameters():
        p.grad = None
    sparse.detach(model, params)
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_sparse_gradients_equal_autograd_of_the_dense_formulation(kind):
    generator = torch.Generator().manual_seed(0)
    torch.set_default_dtype(torch.float64)
    if kind == "mlp":
        model, x = TinyMLP(dims=(12, 9, 7)), torch.randn(5, 3, 12)  # a token dimension, as in a transformer
    else:
        model, x = _vit(), torch.randn(2, 3, 32, 32)
    full = ["head.weight", "head.bias"]
    indices = _random_indices(model, 2, generator)
    values = {n: torch.randn(i.numel(), generator=generator) for n, i in indices.items()}
    out_dense, dense = _gradients(model, indices, full, x, "dense", values)
    out_sparse, fast = _gradients(model, indices, full, x, "sparse", values)

    assert torch.equal(out_sparse, out_dense)  # the same effective weights, the same GEMMs
    assert dense.keys() == fast.keys()
    for name in dense:
        torch.testing.assert_close(fast[name], dense[name], rtol=1e-6, atol=1e-9, msg=name)
        assert fast[name].abs().sum() > 0, name


def test_the_sparse_path_is_taken_and_hooks_survive(tiny_mlp):
    indices = {"fc1.weight": torch.tensor([0, 7, 29]), "fc2.weight": torch.tensor([3, 4])}
    before = copy.deepcopy(tiny_mlp.state_dict())
    seen = []
    kept = tiny_mlp.fc1.register_forward_hook(lambda m, i, o: seen.append("fc1"))
    params = sparse.attach(tiny_mlp, indices, ["head.weight"])
    assert all(d.sparse_path for d in params.deltas.values())
    added = tiny_mlp.fc2.register_forward_pre_hook(lambda m, i: seen.append("fc2-pre"))
    try:
        tiny_mlp(torch.randn(4, 6)).sum().backward()
    finally:
        added.remove()
    assert seen == ["fc1", "fc2-pre"]
    # The frozen base is restored after every forward and backward, bit for bit, and got no gradient.
    for name, module in (("fc1", tiny_mlp.fc1), ("fc2", tiny_mlp.fc2)):
        original = module.parametrizations.weight.original
        assert torch.equal(original, before[f"{name}.weight"]) and original.grad is None
    assert all(d.delta.grad is not None for d in params.deltas.values())

    sparse.detach(tiny_mlp, params)
    assert type(tiny_mlp.fc1) is nn.Linear and "forward" not in vars(tiny_mlp.fc1)
    assert all(torch.equal(v, before[k]) for k, v in tiny_mlp.state_dict().items())
    tiny_mlp(torch.randn(2, 6))
    assert seen[-1] == "fc1"  # the hook registered before attaching is still there
    kept.remove()


def test_evaluation_never_writes_into_the_base(tiny_mlp):
    params = sparse.attach(tiny_mlp, {"fc1.weight": torch.tensor([0, 7])}, [])
    with torch.no_grad():
        params.deltas["fc1.weight"].delta.fill_(0.5)
    base = tiny_mlp.fc1.parametrizations.weight.original
    version, x = base._version, torch.randn(3, 6)
    with torch.inference_mode():
        out = tiny_mlp(x)
    assert base._version == version  # a copy without gradients: several threads may evaluate one model
    assert torch.equal(out, tiny_mlp(x))  # the same numbers as the training path's overlay
    assert base._version > version


def test_an_exception_mid_layer_restores_the_base(tiny_mlp):
    params = sparse.attach(tiny_mlp, {"fc2.weight": torch.tensor([1, 2])}, [])
    with torch.no_grad():
        params.deltas["fc2.weight"].delta.fill_(3.0)
    base = tiny_mlp.fc2.parametrizations.weight.original.clone()
    with pytest.raises(RuntimeError):
        tiny_mlp.fc2(torch.randn(2, 7))  # wrong input width: the GEMM raises with the overlay in place
    assert torch.equal(tiny_mlp.fc2.parametrizations.weight.original, base)


def test_dense_path_and_unusual_layers_keep_the_parametrization():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    params = sparse.attach(model, {"0.weight": torch.tensor([0, 5]), "1.weight": torch.tensor([1])}, [])
    assert [d.sparse_path for d in params.deltas.values()] == [False, True]
    params = sparse.attach(mha, {"out_proj.weight": torch.tensor([0, 9])}, [])  # a Linear subclass read directly
    assert not params.deltas["out_proj.weight"].sparse_path
    dense = sparse.attach(TinyMLP(), {"fc1.weight": torch.tensor([0])}, [], path="dense")
    assert not dense.deltas["fc1.weight"].sparse_path
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        sparse.attach(TinyMLP(), {}, [], path="fast")


def test_the_sampled_product_in_chunks_and_by_gather(monkeypatch):
    torch.set_default_dtype(torch.float64)
    owner = sparse.SparseAdd(torch.tensor([0, 3, 4, 11, 17, 18, 19]))
    owner.build_pattern(torch.Size([4, 5]))
    assert owner.crow.tolist() == [0, 3, 3, 4, 7]  # rows 0, 0, 0, 2, 3, 3, 3
    dy, x = torch.randn(13, 4), torch.randn(13, 5)
    expected = (dy.t() @ x).reshape(-1)[owner.index]
    torch.testing.assert_close(owner.sampled_grad(dy, x), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 20)  # 2 tokens, or 1 entry, per chunk
    torch.testing.assert_close(owner.sampled_grad(dy, x), expected, rtol=1e-12, atol=1e-12)
    # The gather used on devices without sampled_addmm, run here on the CPU.
    torch.testing.assert_close(owner._gathered_product(dy, x), expected, rtol=1e-12, atol=1e-12)


class _LargestNewTensor(TorchDispatchMode):
    """The largest strided tensor an op creates (in-place results, which return an input, do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor) and a.layout == torch.strided
        }
        for t in torch.utils._pytree.tree_leaves(out):
            # A CSR tensor is a view of its index and value tensors, each counted where it is made.
            if (
                isinstance(t, torch.Tensor)
                and t.layout == torch.strided
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_a_training_step_makes_no_dense_weight_sized_tensor(path):
    model = TinyMLP(dims=(64, 256, 8))  # fc1: 16384 weights; a batch of 2 has at most 512 activations
    indices = {"fc1.weight": torch.arange(0, 16384, 41), "fc2.weight": torch.arange(0, 2048, 7)}
    params = sparse.attach(model, indices, ["head.weight"], path=path)
    optimizer = make_optimizer(params, TrainConfig())
    with _LargestNewTensor() as mode:
        for _ in range(2):
            with sparse.recompute_sparse_weights():
                loss = model(torch.randn(2, 64)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if path == "sparse":
        assert mode.largest < 2048
    else:  # the benchmark's baseline: the dense effective weight and its dense gradient exist transiently
        assert mode.largest == 16384


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_follow_the_dense_path(precision):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    x = torch.randn(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(1)
    trained = {}
    for path in ("dense", "sparse"):
        torch.manual_seed(0)
        model = _vit()
        indices = _random_indices(model, 2, generator.manual_seed(1))
        params = sparse.attach(model, indices, ["head.weight", "head.bias"], path=path)
        optimizer = make_optimizer(params, TrainConfig(lr=1e-3))
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        for _ in range(3):
            with sparse.recompute_sparse_weights(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(x).float().logsumexp(1).mean()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        trained[path] = {n: p.detach().clone() for n, p in params.named_parameters()}
    # fp32: only the order of the delta gradient's sums differs. bf16 / fp16: the sparse path sums it in fp32 where
    # the dense one rounds a low-precision GEMM.
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype is None else {"rtol": 0.05, "atol": 2e-4}
    for name, value in trained["dense"].items():
        torch.testing.assert_close(trained["sparse"][name], value, **tolerance, msg=name)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        (out.square().sum() + out.sum()).backward()  # the loss of _gradients
    return sum(storages.values())


def test_qkv_fc1_and_fc2_rebuild_the_norm_and_gelu_outputs_instead_of_saving_them(monkeypatch):
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    assert all(type(b.mlp.act) is nn.GELU for b in model.blocks)
    assert all(isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm) for b in model.blocks)
    indices = _random_indices(model, 2, generator)
    values = {n: torch.randn(i.numel(), generator=generator) for n, i in indices.items()}
    full = ["head.weight", "head.bias"]
    _, dense = _gradients(model, indices, full, x, "dense", values)
    outputs = {"gelu": [], "norm": []}  # every GELU and block norm output: what fc2, qkv and fc1 no longer keep
    handles = []
    for block in model.blocks:
        for kind, module in (("gelu", block.mlp.act), ("norm", block.norm1), ("norm", block.norm2)):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, kind=kind: outputs[kind].append(o.numel() * o.element_size())
                )
            )
    with torch.no_grad():
        model(x)
    for handle in handles:  # measured before attaching: a foreign hook turns the recipes off
        handle.remove()
    params = sparse.attach(model, indices, full, values=values)

    taken = sparse._RECIPES_TAKEN[0]
    with_recipe = _saved_bytes(model, x.clone().requires_grad_(True))
    assert sparse._RECIPES_TAKEN[0] - taken == 3 * len(model.blocks)  # every block's qkv, fc1 and fc2
    grads = {n: p.grad.clone() for n, p in params.named_parameters()}
    for p in params.parameters():
        p.grad = None
    monkeypatch.setattr(sparse, "_input_recipe", lambda *args: None)
    without = _saved_bytes(model, x.clone().requires_grad_(True))
    gelu, norm = sum(outputs["gelu"]), sum(outputs["norm"])
    assert gelu > 0 and norm > 0
    assert without - with_recipe == gelu + norm  # exactly the GELU and the LayerNorm outputs
    for name, value in grads.items():  # fp64: the same gradients as autograd of the dense formulation
        torch.testing.assert_close(value, dense[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_recipe_changes_no_bit_of_a_training_run(monkeypatch, precision):
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    x = torch.randn(2, 3, 32, 32)
    trained = {}
    for recipe in (True, False):
        if not recipe:
            monkeypatch.setattr(sparse, "_input_recipe", lambda *args: None)
        torch.manual_seed(0)
        model = _vit()
        indices = _random_indices(model, 2, torch.Generator().manual_seed(1))
        params = sparse.attach(model, indices, ["head.weight", "head.bias"])
        optimizer = make_optimizer(params, TrainConfig(lr=1e-3))
        taken = sparse._RECIPES_TAKEN[0]
        for _ in range(3):
            with sparse.recompute_sparse_weights(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(x).float().logsumexp(1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # 3 steps; not block 0's qkv: its norm's input (image + frozen embeddings) needs no gradient, so that norm's
        # backward does not run and nothing keeps the input.
        assert sparse._RECIPES_TAKEN[0] - taken == (3 * (3 * len(model.blocks) - 1) if recipe else 0)
        trained[recipe] = {n: p.detach().clone() for n, p in params.named_parameters()}
    for name, value in trained[False].items():
        assert torch.equal(trained[True][name], value), name


def test_no_recipe_when_something_lies_between_the_activation_or_norm_and_the_linear():
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    model.blocks[0].mlp.drop1 = nn.Dropout(0.1)  # a new tensor between GELU and fc2
    model.blocks[2].norm1 = nn.Sequential(model.blocks[2].norm1, nn.Dropout(0.1))  # between norm1 and qkv
    model.blocks[5].norm2._fast_norm = True  # timm's fast norm: not an exact recipe
    params = sparse.attach(model, _random_indices(model, 2, torch.Generator().manual_seed(0)), [])
    taken = sparse._RECIPES_TAKEN[0]
    model(x).sum().backward()
    # and not block 0's qkv: no gradient reaches its norm
    assert sparse._RECIPES_TAKEN[0] - taken == 3 * len(model.blocks) - 4
    with torch.no_grad():  # evaluation: nothing recorded
        hidden = model.blocks[2].mlp.act(torch.randn(3, 4, requires_grad=True))
        normed = model.blocks[1].norm1(torch.randn(3, 64, requires_grad=True))
    assert not hasattr(hidden, "_fps_recipe") and not hasattr(normed, "_fps_recipe")

    # A hook on the activation or norm could change its output in place through .data, which bumps no version: no
    # recipe for that output (the others keep theirs).
    mine = [
        model.blocks[1].mlp.act.register_forward_hook(lambda m, i, o: o.mul_(1.0)),
        model.blocks[3].norm2.register_forward_hook(lambda m, i, o: None),
    ]
    taken = sparse._RECIPES_TAKEN[0]
    model(x).sum().backward()
    assert sparse._RECIPES_TAKEN[0] - taken == 3 * len(model.blocks) - 6

    sparse.detach(model, params)
    assert not any(b.mlp.act._forward_hooks for b in model.blocks[2:])
    assert not any(b.norm2._forward_hooks for b in model.blocks[4:])
    assert len(model.blocks[1].mlp.act._forward_hooks) == 1  # the user's hooks stay
    assert len(model.blocks[3].norm2._forward_hooks) == 1
    hidden = model.blocks[2].mlp.act(torch.randn(3, 4, requires_grad=True))
    normed = model.blocks[1].norm1(torch.randn(3, 64, requires_grad=True))
    assert not hasattr(hidden, "_fps_recipe") and not hasattr(normed, "_fps_recipe")
    for handle in mine:
        handle.remove()


def test_an_activation_input_changed_before_the_backward_is_rejected():
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3))
    sparse.attach(model, {"2.weight": torch.tensor([0, 9, 17])}, [])
    x = torch.randn(4, 5, requires_grad=True)
    hidden = model[0](x)
    out = model[2](model[1](hidden))
    hidden.add_(1.0)  # the tensor fc2's backward would rebuild its input from
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_norm_weight_changed_before_the_backward_is_rejected():
    model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 3))
    sparse.attach(model, {"1.weight": torch.tensor([0, 9, 14])}, ["0.weight"])
    x = torch.randn(4, 5, requires_grad=True)
    taken = sparse._RECIPES_TAKEN[0]
    out = model(x)
    assert sparse._RECIPES_TAKEN[0] - taken == 1  # torch's own LayerNorm, too
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # what the Linear's backward would rebuild its input with
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    def bump(module, args):
        with torch.no_grad():
            model[0].weight.add_(0.0)  # between the norm and the Linear: the rebuild could differ, no recipe

    model[1].register_forward_pre_hook(bump)
    taken = sparse._RECIPES_TAKEN[0]
    model(x)
    assert sparse._RECIPES_TAKEN[0] == taken


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _llama_indices(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    indices = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            out, fan_in = module.weight.shape
            cols = torch.stack([torch.randperm(fan_in, generator=generator)[:2] for _ in range(out)])
            indices[f"{name}.weight"] = (torch.arange(out)[:, None] * fan_in + cols).reshape(-1).sort().values
    return indices


def _with_torch_rms_norms(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        for attr in ("input_layernorm", "post_attention_layernorm"):
            setattr(layer, attr, nn.RMSNorm(32, eps=1e-6))
    return model


@pytest.mark.parametrize("norm", ["llama", "torch"])
def test_rms_norms_are_rebuilt_instead_of_saved(norm):
    """transformers' LlamaRMSNorm (fp32: it computes in fp32) and torch.nn.RMSNorm (fp64): q/k/v and gate/up rebuild
    the norm output, down_proj the gated product act(gate) * up: the same gradients as the dense path, and exactly
    the norm outputs and the products fewer bytes saved."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.set_default_dtype(torch.float32 if norm == "llama" else torch.float64)
    generator = torch.Generator().manual_seed(0)
    model = _tiny_llama() if norm == "llama" else _with_torch_rms_norms(_tiny_llama())
    kind = LlamaRMSNorm if norm == "llama" else nn.RMSNorm
    assert all(sparse._exact_recipe(m) is not None for m in model.modules() if isinstance(m, kind))
    ids = torch.randint(0, 64, (2, 7), generator=generator)
    indices = _llama_indices(model, generator)
    values = {n: torch.randn(i.numel(), generator=generator) for n, i in indices.items()}
    full = ["lm_head.weight"]

    def loss_of(m):
        return m(input_ids=ids).logits.float().logsumexp(-1).mean()

    dense = sparse.attach(model, indices, full, values=values, path="dense")
    loss_of(model).backward()
    expected = {n: p.grad.clone() for n, p in dense.named_parameters()}
    for p in dense.parameters():
        p.grad = None
    sparse.detach(model, dense)

    outputs = []  # the layers' norm outputs (not the final norm's, which feeds the unmasked lm_head)
    layers = model.model.layers
    # Not layer 0's input norm: its input (frozen embeddings) needs no gradient, so nothing keeps it.
    norms = [layer.post_attention_layernorm for layer in layers] + [layer.input_layernorm for layer in layers[1:]]
    products = [layer.mlp.act_fn for layer in layers]  # each product has the activation output's size
    handles = [
        n.register_forward_hook(lambda m, i, o: outputs.append(o.numel() * o.element_size())) for n in norms + products
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()

    params = sparse.attach(model, indices, full, values=values)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    # It returns every tensor as it is, like fps's own recompute_sparse_weights: the gated product's operands may be
    # read under it (under other saved-tensor hooks, checkpointing's or offloading's, the product is saved).
    pack._fps_pack = True
    taken = sparse._RECIPES_TAKEN[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model).backward()
    # q, k, v, gate, up, down; not layer 0's q, k, v
    assert sparse._RECIPES_TAKEN[0] - taken == 6 * len(layers) - 3
    with_recipe = sum(storages.values())
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if norm == "llama" else {"rtol": 1e-6, "atol": 1e-9}
    for name, value in expected.items():
        torch.testing.assert_close(dict(params.named_parameters())[name].grad, value, **tolerance, msg=name)
    for p in params.parameters():
        p.grad = None
    storages.clear()
    original = sparse._input_recipe
    sparse._input_recipe = lambda *args: None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of(model).backward()
    finally:
        sparse._input_recipe = original
    assert sum(storages.values()) - with_recipe == sum(outputs)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("norm", ["llama", "torch"])
def test_the_rms_norm_recipe_changes_no_bit_of_a_training_run(monkeypatch, precision, norm):
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    trained = {}
    for recipe in (True, False):
        if not recipe:
            monkeypatch.setattr(sparse, "_input_recipe", lambda *args: None)
        torch.manual_seed(0)
        model = _tiny_llama() if norm == "llama" else _with_torch_rms_norms(_tiny_llama())
        indices = _llama_indices(model, torch.Generator().manual_seed(1))
        params = sparse.attach(model, indices, ["lm_head.weight"])
        optimizer = make_optimizer(params, TrainConfig(lr=1e-3))
        taken = sparse._RECIPES_TAKEN[0]
        for _ in range(3):
            with sparse.recompute_sparse_weights(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if recipe:  # under bf16 autocast the fp32 norm output is cast for the Linear, rebuilt the same way
            assert sparse._RECIPES_TAKEN[0] - taken == 3 * (6 * len(model.model.layers) - 3)
        trained[recipe] = {n: p.detach().clone() for n, p in params.named_parameters()}
    for name, value in trained[False].items():
        assert torch.equal(trained[True][name], value), name


class _NoReuse:
    """_SiblingInputs without its cache: every layer rebuilds and transposes its own input."""

    def rebuilt(self, function, tensors, meta):
        return sparse._recompute(function, tensors, meta)

    def transposed(self, x, start, step, dtype):
        return x[start : start + step].to(dtype).t().contiguous()


def test_sibling_layers_rebuild_their_shared_input_once_and_change_no_bit(monkeypatch):
    """q, k and v read one norm output, gate and up another: each is rebuilt (and transposed for the CPU kernel)
    once per backward, with the gradients of every layer doing its own, and nothing is kept after the backward."""
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    rebuilt = []
    original = sparse._recompute
    monkeypatch.setattr(sparse, "_recompute", lambda *a, **k: rebuilt.append(1) or original(*a, **k))
    grads = {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(sparse, "_SIBLINGS", _NoReuse())
        torch.manual_seed(0)
        model = _tiny_llama()
        params = sparse.attach(model, _llama_indices(model, torch.Generator().manual_seed(1)), [])
        rebuilt.clear()
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        layers = len(model.model.layers)
        if reuse:
            # per layer: the input norm's output (q, k, v; not layer 0's, whose input needs no gradient), the
            # post-attention norm's (gate, up) and the gated product (down)
            assert len(rebuilt) == 3 * layers - 1
            assert sparse._SIBLINGS.x is None and not sparse._SIBLINGS.chunks  # emptied when the backward ended
        else:
            assert len(rebuilt) == 6 * layers - 3
        grads[reuse] = {n: p.grad.clone() for n, p in params.named_parameters()}
    for name, grad in grads[False].items():
        assert torch.equal(grads[True][name], grad), name
