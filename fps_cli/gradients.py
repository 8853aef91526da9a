"""Where the GPS gradients are gathered: the baseline FPS is compared against (DESIGN.md section 2).

GPS (Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning", CVPR 2024,
https://github.com/FightingFighting/GPS) scores every weight by the magnitude of its gradient, summed over one pass
of the task's data with no optimizer step. As in its released code (``train_gps.py: calculate_gradient``,
``SupConLoss``), the loss is a supervised contrastive loss (temperature 0.07, base temperature 0.07) on the
L2-normalised pre-logits feature of two augmented views of each image; ``ce`` instead backpropagates a
cross-entropy through the model's (new) head. Each batch's mean loss is backpropagated and the gradients add up in
``.grad``, exactly like GPS's loop.

Two deliberate differences from the released code, both so that ``--no-augment`` gives an exactly reproducible mask:
the model runs in eval mode (no dropout / drop-path noise, no BatchNorm running statistics updated on the caller's
model), and only the candidate weights require gradients (the others get none, which changes no candidate's
gradient). The backward pass is real, so the peak memory is that of full fine-tuning: that is the cost FPS avoids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import autocast
from .constants import GPS_LOSSES
from .errors import ModelError
from .models import output_logits

GPS_TEMPERATURE = 0.07
GPS_BASE_TEMPERATURE = 0.07


def supcon_loss(
    features: Tensor,
    labels: Tensor,
    temperature: float = GPS_TEMPERATURE,
    base_temperature: float = GPS_BASE_TEMPERATURE,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, https://arxiv.org/abs/2004.11362), ``contrast_mode='all'``.

    Every view of every sample is an anchor; its positives are all other views of samples with the same label
    (its own other view included), its contrast set every other view in the batch.

    Args:
        features: ``[batch, views, dim]``; L2-normalised here, along ``dim``.
        labels: ``[batch]`` class indices.
        temperature: softmax temperature.
        base_temperature: the loss is scaled by ``temperature / base_temperature``.

    Returns:
        The mean loss over all anchors (a scalar).
    """
    batch, views, _ = features.shape
    features = F.normalize(features, dim=-1)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # [views*batch, dim], view-major
    logits = contrast @ contrast.T / temperature  # [n, n]
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # numerical stability only
    labels = labels.reshape(-1)
    same_label = (labels[:, None] == labels[None, :]).repeat(views, views)  # [n, n]
    not_self = ~torch.eye(views * batch, dtype=torch.bool, device=features.device)
    positives = (same_label & not_self).float()
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    # With two views every anchor has at least one positive; the clamp only guards a single-view call.
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


class TwoViews:
    """An image transform that returns two views of one image, stacked: ``[2, 3, H, W]``.

    Args:
        transform: the per-view transform.
        deterministic: the transform is deterministic, so the second view is the first one again.
    """

    def __init__(self, transform: Callable, deterministic: bool = False) -> None:
        self.transform, self.deterministic = transform, deterministic

    def __call__(self, img: object) -> Tensor:
        first = self.transform(img)
        second = first if self.deterministic else self.transform(img)
        return torch.stack([first, second])


def contrastive_transform(model: nn.Module, img_size: int | None = None) -> Callable:
    """GPS's per-view augmentation at the model's input size, with timm's normalisation for ``model``.

    RandomResizedCrop (scale 0.08-1, the model's interpolation), horizontal flip, colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, greyscale with p=0.2, then ToTensor and Normalize.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    from .data import transform_config

    config = transform_config(model, img_size)
    size = tuple(config["input_size"][-2:])
    return T.Compose(
        [
            RandomResizedCropAndInterpolation(size, scale=(0.08, 1.0), interpolation=config["interpolation"]),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean=config["mean"], std=config["std"]),
        ]
    )


def gps_transform(model: nn.Module, img_size: int | None = None, augment: bool = True) -> TwoViews:
    """The two-view transform of GPS: random augmentation, or with ``augment=False`` the eval transform twice."""
    from .data import eval_transform

    if augment:
        return TwoViews(contrastive_transform(model, img_size))
    return TwoViews(eval_transform(model, img_size), deterministic=True)


def pre_logits(model: nn.Module, images: Tensor) -> Tensor:
    """The feature the head sees, ``[batch, dim]``.

    timm: ``forward_head(forward_features(x), pre_logits=True)``. Other models (Hugging Face transformers): the
    input of the single head module, caught by a forward pre-hook (e.g. the final CLS token of a ViT, the pooled
    feature of a ConvNeXt), flattened.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    from .candidates import find_head

    heads = find_head(model)
    if len(heads) != 1:
        raise ModelError(
            f"{type(model).__name__} has {len(heads)} head modules and no forward_features / forward_head, so "
            "--gps-loss supcon cannot tell its pre-logits feature; use --gps-loss ce"
        )
    seen: list[Tensor] = []

    def keep_input(module: nn.Module, args: tuple) -> None:  # returns None: the head's input is left as it is
        seen.append(args[0])

    handle = heads[0].register_forward_pre_hook(keep_input)
    try:
        model(images)
    finally:
        handle.remove()
    if not seen:
        raise ModelError(f"the head of {type(model).__name__} was not called; use --gps-loss ce")
    return seen[0].reshape(images.shape[0], -1)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gps_loss(model: nn.Module, views: Tensor, labels: Tensor, loss: str = "supcon") -> Tensor:
    """The GPS loss of one batch of two-view images.

    Args:
        model: the model (autocast, if any, is the caller's).
        views: ``[batch, 2, 3, H, W]``.
        labels: ``[batch]``.
        loss: ``supcon`` (on the pre-logits feature) or ``ce`` (on the head's logits).
    """
    batch, n_views = views.shape[:2]
    images = views.transpose(0, 1).reshape(batch * n_views, *views.shape[2:])  # [views*batch, 3, H, W], view-major
    if loss == "supcon":
        features = pre_logits(model, images)  # [views*batch, dim]
        features = _at_least_fp32(features).reshape(n_views, batch, -1).transpose(0, 1)  # [batch, views, dim]
        with torch.autocast(images.device.type, enabled=False):  # the loss itself in fp32
            return supcon_loss(features, labels)
    if loss == "ce":
        logits = _at_least_fp32(output_logits(model(images)))  # [views*batch, classes]
        return F.cross_entropy(logits, labels.repeat(n_views))
    raise ValueError(f"unknown GPS loss {loss!r}; expected one of {GPS_LOSSES}")


def collect_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    loss: str = "supcon",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
    reduce: Callable[[list[Tensor]], None] | None = None,
    batch_loss: Callable[[nn.Module, Mapping[str, Any], str], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Backpropagate the GPS loss of every batch once and return each weight's summed gradient (fp32 or better).

    Each batch's gradient is added to an fp64 sum (8 bytes per candidate weight), so the result does not depend
    on the order of the batches: the same on one process as summed over torchrun ranks.

    No optimizer step is taken and the model is left as it was: its ``requires_grad`` flags, ``.grad`` and
    train / eval mode are restored, also after an exception.

    Args:
        model: the model, already on ``device``.
        weights: name -> candidate weight whose gradient to sum.
        batches: ``(views [batch, 2, 3, H, W], labels [batch])``.
        loss: ``supcon`` or ``ce``.
        device: where the model runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast for the forward pass; gradients stay fp32).
        on_batch: called with the number of images after each batch.
        reduce: sums the fp64 totals across processes, in place (torchrun), before they are cast.
        batch_loss: ``batch_loss(model, batch, loss)`` for dict batches (a task's ``gps_loss``, see
            :mod:`fps_cli.tasks`; tensors moved to ``device`` here); default: ``batches`` are ``(views, labels)``.
    """
    if loss not in GPS_LOSSES:
        raise ValueError(f"unknown GPS loss {loss!r}; expected one of {GPS_LOSSES}")
    device = torch.device(device)
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    summed: dict[str, Tensor] = {}
    totals = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in weights.items()}
    try:
        model.eval()
        wanted = {id(w) for w in weights.values()}
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in wanted)
        dtype = next(iter(weights.values())).dtype if weights else torch.float32
        with torch.enable_grad():
            for batch in batches:
                if batch_loss is None:
                    views, labels = batch
                    views = views.to(device, dtype=dtype, non_blocking=True)  # the model's dtype (fp32 unless cast)
                    labels = labels.to(device, non_blocking=True)
                    with autocast(device, precision):
                        value = gps_loss(model, views, labels, loss)
                    size = views.shape[0]
                else:
                    batch = {
                        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
                    }
                    with autocast(device, precision):
                        value = batch_loss(model, batch, loss)
                    size = len(batch["labels"])
                value.backward()
                for name, w in weights.items():
                    if w.grad is not None:
                        totals[name] += w.grad
                        w.grad = None
                if on_batch is not None:
                    on_batch(size)
        if reduce is not None:
            reduce(list(totals.values()))
        for name, w in weights.items():
            summed[name] = totals[name].to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return summed
