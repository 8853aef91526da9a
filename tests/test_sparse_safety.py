"""The sparse path in people's own loops: exact, or out of the way (issue 20).

Every check compares the sparse path with the dense formulation (the parametrization, where autograd saves what
each layer really received) or with a hand-written tied / functional formulation, in fp64.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fps_cli import sparse
from fps_cli.candidates import parameter_roles
from fps_cli.errors import FpsError


def _model(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), *middle, nn.Linear(6, 4)).double()


def _delta_grads(model: nn.Module, indices: dict, path: str, x: torch.Tensor, setup=None) -> dict:
    """Delta gradients of ``(out**2).sum()`` with the deltas attached on ``path`` (``setup(model)`` after attach)."""
    generator = torch.Generator().manual_seed(3)
    values = {n: torch.randn(i.numel(), generator=generator, dtype=torch.float64) for n, i in indices.items()}
    params = sparse.attach(model, indices, [], values=values, path=path)
    undo = setup(model) if setup is not None else None
    try:
        out = model(x.clone().requires_grad_(True))
        out.square().sum().backward()
    finally:
        for handle in undo or []:
            handle.remove()
    grads = {n: d.delta.grad.clone() for n, d in params.deltas.items()}
    sparse.detach(model, params)
    return grads


def _assert_same_as_dense(make_model, indices, x, setup, expect_recipe: bool | None = None):
    dense = _delta_grads(make_model(), indices, "dense", x, setup)
    taken = sparse._RECIPES_TAKEN[0]
    fast = _delta_grads(make_model(), indices, "sparse", x, setup)
    if expect_recipe is not None:
        assert (sparse._RECIPES_TAKEN[0] > taken) == expect_recipe
    for name, value in dense.items():
        torch.testing.assert_close(fast[name], value, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------ 1. hooks that change the output

LAST = {"2.weight": torch.tensor([0, 7, 11, 20])}
X = torch.randn(3, 4, 5, dtype=torch.float64)


def _double(module, args, output):
    return output * 2


def _double_data(module, args, output):
    output.data.mul_(2)  # bumps no version counter


@pytest.mark.parametrize(
    "where",
    ["prepend-after-attach", "global-hook", "data-in-place", "data-in-place-prepend", "between", "global-pre-hook"],
)
def test_a_hook_that_changes_the_norm_output_is_seen_by_the_gradient(where):
    def setup(model):
        if where == "prepend-after-attach":
            return [model[1].register_forward_hook(_double, prepend=True)]
        if where == "global-hook":
            return [
                nn.modules.module.register_module_forward_hook(
                    lambda m, a, o: o * 2 if isinstance(m, nn.LayerNorm) else None
                )
            ]
        if where == "data-in-place":
            return [model[1].register_forward_hook(_double_data)]
        if where == "data-in-place-prepend":
            return [model[1].register_forward_hook(_double_data, prepend=True)]
        if where == "between":  # a hook on a module between the norm and the Linear (an Identity)
            return [model[2].register_forward_hook(_double_data)]

        def pre(module, args):
            if module is model[-1]:
                args[0].data.mul_(2)

        return [nn.modules.module.register_module_forward_pre_hook(pre)]

    middle = (nn.LayerNorm(6), nn.Identity()) if where == "between" else (nn.LayerNorm(6),)
    indices = {f"{len(middle) + 1}.weight": LAST["2.weight"], "0.weight": torch.tensor([1, 2])}
    _assert_same_as_dense(lambda: _model(*middle).double(), indices, X, setup, expect_recipe=False)


def test_the_recipe_is_still_taken_without_foreign_hooks():
    indices = {"2.weight": LAST["2.weight"], "0.weight": torch.tensor([1, 2])}
    _assert_same_as_dense(lambda: _model(nn.LayerNorm(6)), indices, X, None, expect_recipe=True)
    # and once the hooks are gone again
    model = _model(nn.LayerNorm(6))
    sparse.attach(model, indices, [])
    handle = model[1].register_forward_hook(_double_data)
    handle.remove()
    taken = sparse._RECIPES_TAKEN[0]
    model(X.clone().requires_grad_(True)).sum().backward()
    assert sparse._RECIPES_TAKEN[0] - taken == 1
    # A hook that runs after the Linear took its input (on the whole model, as transformers' output capture puts
    # them on decoder layers) changes nothing.
    handle = model.register_forward_hook(lambda m, a, o: None)
    taken = sparse._RECIPES_TAKEN[0]
    model(X.clone().requires_grad_(True)).sum().backward()
    assert sparse._RECIPES_TAKEN[0] - taken == 1
    handle.remove()


def test_detach_removes_every_hook_fps_added():
    import gc

    from torch.nn.modules import module as hooks

    gc.collect()  # models attached by earlier tests and never detached: their global hooks go with them
    assert not hooks._global_forward_hooks
    before = (dict(hooks._global_forward_hooks), dict(hooks._global_forward_pre_hooks))
    model = _model(nn.LayerNorm(6))
    params = sparse.attach(model, {"2.weight": LAST["2.weight"]}, [])
    assert len(hooks._global_forward_hooks) == len(before[0]) + 1
    sparse.detach(model, params)
    assert (dict(hooks._global_forward_hooks), dict(hooks._global_forward_pre_hooks)) == before
    assert not any(m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------- 2. two threads on one model


def _wide_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).double()


def _run_threads(*targets) -> None:
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # reported to the test thread
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _attach_wide(model):
    indices = {"0.weight": torch.arange(0, 128 * 256, 5), "2.weight": torch.arange(1, 256 * 128, 7)}
    params = sparse.attach(model, indices, [])
    with torch.no_grad():
        for d in params.deltas.values():
            d.delta.normal_()
    return params


def test_evaluation_in_one_thread_while_training_in_another_is_exact():
    model = _wide_model()
    params = _attach_wide(model)
    x = torch.randn(128, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    base = {
        n: d.recompute(model.get_submodule(n[: -len(".weight")]).parametrizations.weight.original)
        for n, d in params.deltas.items()
    }
    wrong = []

    def train():
        for _ in range(100):
            model(x).square().mean().backward()

    def evaluate():
        for _ in range(100):
            with torch.no_grad():
                if not torch.equal(model(x), expected):
                    wrong.append(1)

    _run_threads(train, evaluate)
    assert not wrong, f"{len(wrong)} of 100 evaluation outputs wrong"
    for name, owner in params.deltas.items():
        module = model.get_submodule(name[: -len(".weight")])
        assert torch.equal(owner.recompute(module.parametrizations.weight.original), base[name])


def test_two_training_threads_leave_the_base_unchanged_and_the_gradients_right():
    model = _wide_model()
    params = _attach_wide(model)
    before = {n: model.get_submodule(n[:-7]).parametrizations.weight.original.clone() for n in params.deltas}
    xs = [torch.randn(128, 128, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    steps = 60
    # The reference: the same forwards and backwards, one after the other.
    for x in xs:
        for _ in range(steps):
            model(x).square().mean().backward()
    expected = {n: d.delta.grad.clone() for n, d in params.deltas.items()}
    for d in params.deltas.values():
        d.delta.grad = None

    def train(x):
        return lambda: [model(x).square().mean().backward() for _ in range(steps)]

    _run_threads(train(xs[0]), train(xs[1]))
    for name in params.deltas:
        assert torch.equal(model.get_submodule(name[:-7]).parametrizations.weight.original, before[name]), name
        # fp32 deltas: the two threads' gradients accumulate in another order
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(params.deltas[name].delta.grad, expected[name], rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------------------ 3. load_state_dict and indices


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_load_state_dict_with_other_indices_moves_the_gradients(path):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    old, new = torch.tensor([0, 7, 11, 20]), torch.tensor([2, 3, 13, 23])
    source = _model(nn.Tanh())
    sparse.attach(source, {"2.weight": new}, [], values={"2.weight": torch.arange(4.0, dtype=torch.float64)})
    state = source.state_dict()

    model = _model(nn.Tanh())
    params = sparse.attach(model, {"2.weight": old}, [], path=path)
    model.load_state_dict(state)
    assert torch.equal(params.deltas["2.weight"].index, new)
    model(x.clone().requires_grad_(True)).square().sum().backward()
    # The same gradient as a model attached at the new indices with the source's values.
    reference = _model(nn.Tanh())
    ref = sparse.attach(reference, {"2.weight": new}, [], values={"2.weight": torch.arange(4.0, dtype=torch.float64)})
    reference(x.clone().requires_grad_(True)).square().sum().backward()
    torch.testing.assert_close(params.deltas["2.weight"].delta.grad, ref.deltas["2.weight"].delta.grad)


def test_load_state_dict_with_unsorted_indices_is_refused():
    model = _model(nn.Tanh())
    params = sparse.attach(model, {"2.weight": torch.tensor([0, 7, 11, 20])}, [])
    state = model.state_dict()
    key = next(k for k in state if k.endswith(".index"))
    state[key] = torch.tensor([7, 0, 11, 20])
    with pytest.raises(FpsError, match="sorted"):
        model.load_state_dict(state)
    del params


# ------------------------------------------------------------------------------------------- 4. tied weights


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight  # one tensor, used twice
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.fc2(torch.tanh(self.fc1(x))))

    def get_classifier(self):
        return self.head


def test_a_tied_weight_is_not_a_candidate():
    roles = parameter_roles(_Tied())
    assert "fc1.weight" not in roles.candidates and "fc1.weight" in roles.frozen
    assert "fc1.bias" in roles.fully_trainable and "fc2.bias" in roles.fully_trainable


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_attach_refuses_to_train_part_of_a_tied_weight(path):
    model = _Tied()
    with pytest.raises(FpsError, match=r"fc1\.weight.*fc2\.weight"):
        sparse.attach(model, {"fc1.weight": torch.tensor([0, 5])}, ["head.weight"], path=path)
    assert model.fc1.weight is model.fc2.weight and model.fc1.weight.requires_grad  # left as it was
    params = sparse.attach(model, {}, ["fc1.weight"], path=path)  # in full, it trains as one tensor
    model(torch.randn(2, 6)).sum().backward()
    assert params.full["fc1.weight"].grad is not None


# --------------------------------------------------------------------------------- 5. in-place on the output


@pytest.mark.parametrize("kind", ["relu-inplace", "residual-add"])
def test_an_inplace_op_on_the_output_works(kind):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            out = self.fc(x)
            out += x
            return out

    def make():
        torch.manual_seed(0)
        if kind == "relu-inplace":
            return nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 4)).double()
        return nn.Sequential(Residual(), nn.Linear(5, 4)).double()

    indices = {"0.weight": torch.tensor([0, 7, 11])} if kind == "relu-inplace" else {"0.fc.weight": torch.tensor([3])}
    _assert_same_as_dense(make, indices, X, None)


# --------------------------------------------------------------------------------------- 6. double backward


@pytest.mark.parametrize("middle", ["gelu", "layernorm", "none"])
def test_double_backward_matches_the_dense_path(middle):
    layers = {"gelu": (nn.GELU(),), "layernorm": (nn.LayerNorm(6),), "none": ()}[middle]
    indices = {"0.weight": torch.tensor([1, 2, 9]), f"{len(layers) + 1}.weight": torch.tensor([0, 7, 11, 20])}
    grads = {}
    for path in ("dense", "sparse"):
        model = _model(*layers)
        generator = torch.Generator().manual_seed(3)
        values = {n: torch.randn(i.numel(), generator=generator, dtype=torch.float64) for n, i in indices.items()}
        params = sparse.attach(model, indices, ["0.bias"], values=values, path=path)
        x = X.clone().requires_grad_(True)
        out = model(x)
        (first,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)  # a gradient penalty
        (first.square().sum() + out.sum()).backward()
        grads[path] = {n: p.grad.clone() for n, p in params.named_parameters()}
    for name, value in grads["dense"].items():  # (deltas are fp32: the sums differ in order, in fp32)
        torch.testing.assert_close(grads["sparse"][name], value, rtol=1e-6, atol=1e-8, msg=name)


# --------------------------------------------------------------------------- 7. an instance's own forward kept


def test_a_linear_with_its_own_forward_keeps_it():
    calls = []

    def wrap(module):
        old = module.forward

        def forward(*args, **kwargs):  # as accelerate's add_hook_to_module does
            calls.append(1)
            return old(*args, **kwargs)

        module.forward = forward
        return forward

    def make():
        model = _model(nn.GELU())
        wrap(model[2])
        return model

    indices = {"2.weight": torch.tensor([0, 7, 11, 20])}
    _assert_same_as_dense(make, indices, X, None)
    model = make()
    own = model[2].forward
    params = sparse.attach(model, indices, [])
    assert model[2].forward is own and not params.deltas["2.weight"].sparse_path
    calls.clear()
    model(X)
    assert calls == [1]
    sparse.detach(model, params)
    assert model[2].forward is own


def test_a_gated_product_under_checkpointing_is_saved_not_read_back():
    """Under saved-tensor hooks other than fps's (checkpointing), the product's operands are never read back."""
    from test_sparse_path import _llama_indices, _tiny_llama

    torch.set_default_dtype(torch.float64)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    grads = {}
    for path in ("dense", "sparse"):
        torch.manual_seed(0)
        model = _tiny_llama()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        indices = _llama_indices(model, torch.Generator().manual_seed(1))
        params = sparse.attach(model, indices, ["lm_head.weight"], path=path)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # a foreign pair, outermost
            model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        grads[path] = {n: p.grad.clone() for n, p in params.named_parameters()}
    for name, value in grads["dense"].items():
        torch.testing.assert_close(grads["sparse"][name], value, rtol=1e-6, atol=1e-9, msg=name)
