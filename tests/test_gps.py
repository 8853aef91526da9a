"""The GPS baseline: reproducible with --no-augment, equal to a slow hand-written reference, needs labels."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_VIT, TinyMLP
from typer.testing import CliRunner

from fps_cli.candidates import parameter_roles
from fps_cli.cli import app
from fps_cli.compare import compare_masks
from fps_cli.data import ImageStream, discover, eval_transform, make_loader
from fps_cli.formats import Mask, read_gradient_scores, read_mask, score_statistic
from fps_cli.gradients import collect_gradients, gps_transform, supcon_loss
from fps_cli.models import ModelSpec, create_model
from fps_cli.scoring import as_rows, make_scores
from fps_cli.selection import select
from fps_cli.selector import (
    SelectOptions,
    build_mask,
    reselect,
    run_select,
    seed_everything,
    selection_count,
)

SEED = 7
BATCH = 4
SPEC = ModelSpec("test_vit", pretrained=False, num_classes=3, img_size=32)


def _gps(folder, **kwargs):
    options = SelectOptions(method="gps", budget=0.05, seed=SEED, augment=False, **kwargs)
    return run_select(SPEC, folder, options, batch_size=BATCH, num_workers=0)


def _same_indices(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def supcon_by_hand(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """SupCon written out anchor by anchor (Khosla et al. 2020, eq. 2), base temperature = temperature."""
    batch, views, _ = features.shape
    z = [features[i, v] / features[i, v].norm() for v in range(views) for i in range(batch)]  # view-major
    y = [int(labels[i]) for _ in range(views) for i in range(batch)]
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        log_denominator = torch.log(sum(torch.exp(z[i] @ z[a] / temperature) for a in others))
        positives = [p for p in others if y[p] == y[i]]
        total = total - sum(z[i] @ z[p] / temperature - log_denominator for p in positives) / len(positives)
    return total / len(z)


def test_supcon_matches_hand_written():
    features = torch.randn(5, 2, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1])
    assert torch.allclose(supcon_loss(features, labels), supcon_by_hand(features, labels))


def test_gps_no_augment_is_reproducible(image_folder):
    folder = image_folder(classes=3, per_class=4)
    first, second = _gps(folder), _gps(folder)
    assert _same_indices(first.mask.indices, second.mask.indices)
    assert all(torch.equal(first.gradients[k], second.gradients[k]) for k in first.gradients)
    assert first.mask.provenance["method"] == "gps" and first.mask.provenance["augment"] is False


def reference_gradients(model, samples, transform) -> dict[str, torch.Tensor]:
    """The slow reference: hand SupCon on the pre-logits of both views, autograd per batch, summed."""
    from PIL import Image

    roles = parameter_roles(model)
    weights = [m.weight for m in roles.candidates.values()]
    summed = [torch.zeros_like(w) for w in weights]
    dtype = weights[0].dtype
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in chunk]).to(dtype)
        labels = torch.tensor([label for _, label in chunk])
        x = torch.cat([images, images])  # two identical views (--no-augment), view-major
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        features = torch.stack([features[: len(chunk)], features[len(chunk) :]], dim=1)  # [batch, 2, dim]
        grads = torch.autograd.grad(supcon_by_hand(features, labels), weights)
        summed = [s + g for s, g in zip(summed, grads, strict=True)]
    return dict(zip(roles.candidates, summed, strict=True))


def reference_mask(gradients, roles, budget=0.05):
    scores = {name: as_rows(g).abs() for name, g in gradients.items()}
    return select(scores, selection_count(roles, budget), "neuron")


def test_gps_equals_slow_reference_exactly_in_float64(image_folder):
    """The library's GPS path (two-view loader, collect_gradients, make_scores, build_mask) gives the reference's
    mask exactly. In float64, so that rounding (amplified by the 0.07 temperature) cannot flip a top-k boundary."""
    folder = image_folder(classes=3, per_class=4)
    samples = discover(folder).train.samples
    seed_everything(SEED)
    model = create_model(SPEC).double()
    roles = parameter_roles(model)
    loader = make_loader(samples, gps_transform(model, 32, augment=False), batch_size=BATCH, num_workers=0)
    weights = {name: m.weight for name, m in roles.candidates.items()}
    got = collect_gradients(model, weights, ImageStream(loader, with_labels=True))
    mask = build_mask(roles, make_scores("gps", roles.candidates, gradients=got), SelectOptions("gps", budget=0.05))

    expected = reference_gradients(model, samples, eval_transform(model, 32))
    for name, g in expected.items():
        assert torch.allclose(got[name].double(), g, rtol=1e-6, atol=1e-12), name
    assert _same_indices(mask.indices, reference_mask(expected, roles))


def test_run_select_gps_matches_slow_reference(image_folder):
    """``run_select --method gps`` (fp32) computes the reference's gradients, up to fp32 rounding."""
    folder = image_folder(classes=3, per_class=4)
    result = _gps(folder)
    seed_everything(SEED)
    model = create_model(SPEC).double()
    expected = reference_gradients(model, discover(folder).train.samples, eval_transform(model, 32))
    for name, g in expected.items():
        error = (result.gradients[name].double() - g).abs().max()
        assert error <= 1e-3 * g.abs().max(), name
    reference = Mask(reference_mask(expected, parameter_roles(model)), [], result.mask.shapes)
    assert compare_masks(result.mask, reference).jaccard > 0.95


def test_gps_ce_loss_is_summed_cross_entropy_gradient(tiny_mlp: TinyMLP):
    """--gps-loss ce: cross-entropy on the head's logits of both views, gradients summed over batches."""
    batches = [(torch.randn(3, 2, 6), torch.tensor([0, 2, 1])), (torch.randn(2, 2, 6), torch.tensor([1, 1]))]
    weights = {"fc1.weight": tiny_mlp.fc1.weight, "fc2.weight": tiny_mlp.fc2.weight}
    got = collect_gradients(tiny_mlp, weights, batches, loss="ce")

    expected = [torch.zeros_like(w) for w in weights.values()]
    for views, labels in batches:
        logits = tiny_mlp(torch.cat([views[:, 0], views[:, 1]]))
        loss = torch.nn.functional.cross_entropy(logits, torch.cat([labels, labels]))
        expected = [e + g for e, g in zip(expected, torch.autograd.grad(loss, list(weights.values())), strict=True)]
    for name, e in zip(weights, expected, strict=True):
        assert torch.allclose(got[name], e, atol=1e-6)
    # The model is left as it was: no .grad, flags restored.
    assert all(p.grad is None and p.requires_grad for p in tiny_mlp.parameters())


def test_collect_gradients_restores_model_after_error(tiny_mlp: TinyMLP):
    def broken():
        yield torch.randn(2, 2, 6), torch.tensor([0, 1])
        raise RuntimeError("disk on fire")

    tiny_mlp.train()
    with pytest.raises(RuntimeError):
        collect_gradients(tiny_mlp, {"fc1.weight": tiny_mlp.fc1.weight}, broken(), loss="ce")
    assert tiny_mlp.training
    assert all(p.grad is None and p.requires_grad for p in tiny_mlp.parameters())


def test_gps_with_augmentation_is_seeded(image_folder):
    folder = image_folder(classes=2, per_class=3)
    options = SelectOptions(method="gps", budget=0.05, seed=SEED)
    a = run_select(SPEC, folder, options, batch_size=BATCH, num_workers=0)
    b = run_select(SPEC, folder, options, batch_size=BATCH, num_workers=0)
    assert _same_indices(a.mask.indices, b.mask.indices)
    assert a.mask.provenance["augment"] is True


def test_flat_folder_fails_with_gps_and_says_fps_needs_no_labels(image_folder, tmp_path):
    folder = image_folder(flat=True, per_class=4)
    args = ["select", *TINY_VIT, "--data", str(folder), "--method", "gps", "--num-workers", "0"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "m.safetensors"), "--no-scores"])
    assert result.exit_code == 1
    assert "--method gps needs labels" in result.output
    assert "--method fps, which does not need labels" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_from_scores_reproduces_gps_mask(image_folder, tmp_path):
    folder = image_folder(classes=3, per_class=3)
    mask, scores = tmp_path / "mask.safetensors", tmp_path / "scores.safetensors"
    common = ["--budget", "0.05", "--seed", str(SEED), "-q"]
    args = ["select", *TINY_VIT, "--data", str(folder), "--method", "gps", "--num-workers", "0"]
    result = CliRunner().invoke(app, [*args, *common, "-o", str(mask), "--scores", str(scores)])
    assert result.exit_code == 0, result.output
    assert score_statistic(scores) == "gradient"
    gradients, prov = read_gradient_scores(scores)
    assert prov["statistic"] == "gradient" and prov["gps_loss"] == "supcon"
    assert all(g.dtype == torch.float32 for g in gradients.values())

    again = tmp_path / "again.safetensors"
    # No --method: a gradient score file re-selects with gps.
    result = CliRunner().invoke(app, ["select", "--from-scores", str(scores), *common, "-o", str(again)])
    assert result.exit_code == 0, result.output
    original, redone = read_mask(mask), read_mask(again)
    assert _same_indices(original.indices, redone.indices)
    assert redone.provenance["method"] == "gps"

    # At another budget and granularity, still from the gradients, with the exact count.
    other = reselect(scores, SelectOptions(method="gps", budget=0.08, granularity="global"))
    assert other.mask.trainable == round(0.08 * other.mask.total_params)

    result = CliRunner().invoke(
        app, ["select", "--from-scores", str(scores), "--method", "fps", "-o", str(again), "--force"]
    )
    assert result.exit_code == 1
    assert "holds GPS gradients" in result.output


def test_gps_budget_count_is_exact(image_folder):
    result = _gps(image_folder(classes=2, per_class=2))
    assert result.mask.trainable == round(0.05 * result.mask.total_params)
    assert math.isclose(result.mask.trainable / result.mask.total_params, 0.05, rel_tol=1e-4)


@pytest.mark.parametrize("flag", [["--no-augment"], ["--gps-loss", "ce"]])
def test_gps_flags_without_gps_are_usage_errors(image_folder, flag):
    result = CliRunner().invoke(app, ["select", *TINY_VIT, "--data", str(image_folder()), *flag])
    assert result.exit_code == 2
    assert "only applies to --method gps" in result.output
