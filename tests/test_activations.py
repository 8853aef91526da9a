"""Input statistics and FPS scores against direct computations from DESIGN.md section 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fps_cli.activations import collect_input_stats, conv_input_sums, input_stats_hooks
from fps_cli.candidates import parameter_roles
from fps_cli.scoring import ActivationScores, fps_scores


def reference_linear_stat(x: torch.Tensor, norm: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).double()
    return rows.abs().mean(0) if norm == "l1" else rows.square().mean(0).sqrt()


def reference_conv_stat(conv: nn.Conv2d, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Statistic per (input channel, kh, kw) over the unfolded patches, zero padding included: [in, kh, kw]."""
    cols = F.unfold(x.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B*L, in*kh*kw]
    stat = cols.abs().mean(0) if norm == "l1" else cols.square().mean(0).sqrt()
    return stat.reshape(conv.in_channels, *conv.kernel_size)


def reference_conv_scores(conv: nn.Conv2d, x: torch.Tensor, norm: str) -> torch.Tensor:
    """s[o, c, i, j] = |W[o, c, i, j]| * a[group(o) * in_per_group + c, i, j], as [out, fan_in]."""
    a = reference_conv_stat(conv, x, norm)
    out, cpg = conv.out_channels, conv.in_channels // conv.groups
    w = conv.weight.detach().double().abs()
    s = torch.empty_like(w)
    for o in range(out):
        g = o // (out // conv.groups)
        s[o] = w[o] * a[g * cpg : (g + 1) * cpg]
    return s.reshape(out, -1)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_mlp_scores_equal_definition(tiny_mlp, norm):
    x = torch.randn(10, 6)
    roles = parameter_roles(tiny_mlp)
    assert list(roles.candidates) == ["fc1.weight", "fc2.weight"]
    stats = collect_input_stats(tiny_mlp, roles.candidates, [x[:4], x[4:]])

    h1 = torch.relu(tiny_mlp.fc1(x)).detach()
    for name, layer_input in (("fc1.weight", x), ("fc2.weight", h1)):
        a = reference_linear_stat(layer_input, norm)
        torch.testing.assert_close(stats[name].statistic(norm).double(), a, rtol=1e-5, atol=1e-7)
        module = roles.candidates[name]
        expected = module.weight.detach().double().abs() * a[None, :]
        got = fps_scores(module, module.weight, stats[name], norm).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=1, padding=2, dilation=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))

    def get_classifier(self):
        return self.head


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_conv_scores_equal_definition(norm):
    net = ConvNet()
    x = torch.randn(5, 4, 9, 11)
    roles = parameter_roles(net)
    stats = collect_input_stats(net, roles.candidates, [x[:2], x[2:]])

    h1 = torch.relu(net.conv1(x)).detach()
    for name, conv, layer_input in (("conv1.weight", net.conv1, x), ("conv2.weight", net.conv2, h1)):
        a = reference_conv_stat(conv, layer_input, norm)
        torch.testing.assert_close(stats[name].statistic(norm).double(), a, rtol=1e-5, atol=1e-6)
        got = fps_scores(conv, conv.weight, stats[name], norm).double()
        torch.testing.assert_close(got, reference_conv_scores(conv, layer_input, norm), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=16, stride=16),  # a ViT patch embedding
        dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), dilation=(1, 2)),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular", groups=2),
    ],
)
def test_conv_input_sums_match_unfold(kwargs):
    conv = nn.Conv2d(4, 6, **kwargs)
    x = torch.randn(3, 4, 32, 32)
    abs_sum, sq_sum, count = conv_input_sums(conv, x)
    padded = F.pad(
        x, conv._reversed_padding_repeated_twice, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode
    )
    cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [B, in*k, L]
    assert count == cols.shape[0] * cols.shape[2] == x.shape[0] * conv(x).shape[2] * conv(x).shape[3]
    torch.testing.assert_close(abs_sum.reshape(-1), cols.abs().sum((0, 2)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sq_sum.reshape(-1), cols.square().sum((0, 2)), rtol=1e-5, atol=1e-4)


def test_conv1d_input_sums_match_unfold():
    conv = nn.Conv1d(3, 5, 4, stride=2, padding=3, dilation=2)
    x = torch.randn(2, 3, 40)
    abs_sum, _, count = conv_input_sums(conv, x)
    cols = F.unfold(x.unsqueeze(2), (1, 4), dilation=(1, 2), padding=(0, 3), stride=(1, 2))
    assert count == 2 * conv(x).shape[-1]
    torch.testing.assert_close(abs_sum.reshape(-1), cols.abs().sum((0, 2)), rtol=1e-5, atol=1e-4)


def test_streamed_equals_one_batch(tiny_mlp):
    x = torch.randn(17, 6)
    roles = parameter_roles(tiny_mlp)
    whole = collect_input_stats(tiny_mlp, roles.candidates, [x])
    streamed = collect_input_stats(tiny_mlp, roles.candidates, [x[:5], x[5:6], x[6:]])
    for name in whole:
        assert whole[name].count == streamed[name].count == 17
        # Equal up to fp32 rounding of each batch's sum (the definition's "fp32 or better").
        torch.testing.assert_close(whole[name].abs_sum.float(), streamed[name].abs_sum.float())
        torch.testing.assert_close(whole[name].sq_sum.float(), streamed[name].sq_sum.float())


def test_module_called_twice_accumulates_every_call():
    shared = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(self.shared(x))

    x = torch.randn(4, 3)
    stats = collect_input_stats(Twice(), {"shared.weight": shared}, [x])
    both = torch.cat([x, shared(x).detach()])
    assert stats["shared.weight"].count == 8
    torch.testing.assert_close(stats["shared.weight"].statistic("l1").double(), reference_linear_stat(both, "l1"))


def test_tokens_of_every_sample_count(tiny_mlp):
    x = torch.randn(2, 7, 6)  # [batch, tokens, features]
    stats = collect_input_stats(tiny_mlp, parameter_roles(tiny_mlp).candidates, [x])
    assert stats["fc1.weight"].count == 14
    torch.testing.assert_close(stats["fc1.weight"].statistic("l2").double(), reference_linear_stat(x, "l2"))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hook_left_after_success_or_exception(tiny_mlp):
    candidates = parameter_roles(tiny_mlp).candidates
    collect_input_stats(tiny_mlp, candidates, [torch.randn(2, 6)])
    assert _hooks(tiny_mlp) == 0

    def batches():
        yield torch.randn(2, 6)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        collect_input_stats(tiny_mlp, candidates, batches())
    assert _hooks(tiny_mlp) == 0

    with pytest.raises(KeyError), input_stats_hooks(candidates):
        assert _hooks(tiny_mlp) == 2
        raise KeyError("x")
    assert _hooks(tiny_mlp) == 0


def test_statistics_accumulate_in_fp64_under_bf16_autocast(tiny_mlp):
    x = torch.randn(8, 6)
    candidates = parameter_roles(tiny_mlp).candidates
    stats = collect_input_stats(tiny_mlp, candidates, [x], precision="bf16")
    assert stats["fc1.weight"].abs_sum.dtype == torch.float64
    torch.testing.assert_close(
        stats["fc1.weight"].statistic("l1").double(), reference_linear_stat(x, "l1"), rtol=1e-2, atol=1e-2
    )


def test_layer_that_never_runs_scores_zero():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    roles = parameter_roles(model, head=[])
    stats = collect_input_stats(model, roles.candidates, [torch.randn(2, 3)])
    scores = ActivationScores("fps", roles.candidates, stats)
    assert scores["unused.weight"].abs().sum() == 0
    assert stats["unused.weight"].count == 0


def test_parameter_roles_by_type(tiny_mlp):
    roles = parameter_roles(tiny_mlp)
    assert roles.fully_trainable == ["fc1.bias", "fc2.bias", "head.weight", "head.bias"]
    assert roles.frozen == []
    no_bias = parameter_roles(tiny_mlp, train_bias=False)
    assert no_bias.fully_trainable == ["head.weight", "head.bias"]
    assert no_bias.frozen == ["fc1.bias", "fc2.bias"]


def test_vit_roles_freeze_norms_and_embeddings():
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    roles = parameter_roles(model)
    assert "patch_embed.proj.weight" in roles.candidates
    assert "head.weight" in roles.fully_trainable and "head.weight" not in roles.candidates
    for frozen in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "norm.weight"):
        assert frozen in roles.frozen
    assert "blocks.0.attn.qkv.bias" in roles.fully_trainable


def test_no_hook_left_on_test_vit_after_an_exception_mid_pass():
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    candidates = parameter_roles(model).candidates

    def batches():
        yield torch.randn(2, 3, 32, 32)
        raise OSError("unreadable shard")

    with pytest.raises(OSError, match="unreadable shard"):
        collect_input_stats(model, candidates, batches())
    assert _hooks(model) == 0
    stats = collect_input_stats(model, candidates, [torch.randn(2, 3, 32, 32)])
    assert _hooks(model) == 0 and stats.keys() == candidates.keys()


def test_the_reductions_run_on_one_thread_and_restore_the_count(monkeypatch):
    """On the CPU the statistics' reductions run with one thread (no parallel region to wait on under load), and the
    thread count is restored afterwards, also after an exception; the sums are those of |x| and x**2."""
    from fps_cli import activations

    torch.set_num_threads(2)
    seen = []
    real = torch.Tensor.addmv_

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmv_", spy)
    x = torch.randn(37, 11)
    abs_sum, sq_sum, count = activations.linear_input_sums(x)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    torch.testing.assert_close(abs_sum, x.abs().sum(0))
    torch.testing.assert_close(sq_sum, x.square().sum(0))
    assert count == 37
    with pytest.raises(RuntimeError), activations.one_thread():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
