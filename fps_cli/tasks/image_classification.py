"""Image classification: timm models and ``hf:`` ``AutoModelForImageClassification``, on image folders.

Data discovery, decoding and transforms are :mod:`fps_cli.data`'s (and timm's); this module only puts them behind
the :class:`~fps_cli.tasks.Task` interface: batches are ``{"pixel_values": [B, 3, H, W], "labels": [B]}`` (GPS:
``pixel_values`` ``[B, 2, 3, H, W]``, two views of each image).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import data
from ..models import output_logits
from . import IMAGE_CLASSIFICATION, Batch, BatchStream, Task, classification


def build_model(spec: Any) -> nn.Module:
    """A timm model, or an ``hf:`` image classifier (:func:`fps_cli.hf.create_hf_model`)."""
    from ..models import create_image_model

    return create_image_model(spec)


def discover(path: Any, data_options: Mapping[str, Any]) -> data.ImageFolder:
    """An image folder's splits, in any layout :func:`fps_cli.data.discover` reads (``dataset_format``)."""
    return data.discover(path, data_options.get("dataset_format", "auto"))


def training_data(path: Any, recorded: Mapping[str, Any], source: str, data_options: Mapping[str, Any]) -> Any:
    """The labelled images ``fps train`` / ``fps eval`` read (:func:`fps_cli.data.training_folder`)."""
    return data.training_folder(path, recorded, source, data_options.get("dataset_format", "auto"))


def _transform(model: nn.Module, purpose: str, img_size: int | None, augment: bool) -> Callable:
    if purpose == "gps":
        from ..gradients import gps_transform

        return gps_transform(model, img_size, augment=augment)
    if purpose == "train" and augment:
        from timm.data import create_transform

        return create_transform(**data.transform_config(model, img_size), is_training=True)
    return data.eval_transform(model, img_size)


def loader(
    model: nn.Module,
    samples: list,
    purpose: str,
    *,
    img_size: int | None = None,
    augment: bool = False,
    data_options: Mapping[str, Any] | None = None,
    **loading: Any,
) -> DataLoader:
    """A loader over ``samples`` with the transform of ``purpose`` (``select`` / ``eval``: timm's eval transform;
    ``train``: timm's train transform when ``augment``; ``gps``: GPS's two views) and :func:`fps_cli.data.make_loader`'s
    ``loading`` arguments (``batch_size``, ``num_workers``, ``sampler``, ``batches``, ...)."""
    return data.make_loader(samples, _transform(model, purpose, img_size, augment), **loading)


class ImageBatches(BatchStream):
    """:class:`fps_cli.data.ImageStream`'s batches as dicts; unreadable images stop it unless ``skip_bad``."""

    def __init__(self, loader: DataLoader, skip_bad: bool = False) -> None:
        super().__init__(loader)
        self._images = data.ImageStream(loader, skip_bad=skip_bad, with_labels=True)
        self.skipped = self._images.skipped

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self._images:
            self.seen = self._images.seen
            yield {"pixel_values": images, "labels": labels}


def stream(loader: DataLoader, skip_bad: bool = False) -> ImageBatches:
    return ImageBatches(loader, skip_bad)


def forward(model: nn.Module, batch: Batch) -> Tensor:
    """The logits (timm models take the images positionally; transformers' take them as ``pixel_values``)."""
    return output_logits(model(batch["pixel_values"]))


def real_tokens(batch: Batch) -> None:
    """Every position of every image counts."""
    return None


def gps_loss(model: nn.Module, batch: Batch, loss: str) -> Tensor:
    """GPS's loss on the two views of each image (:func:`fps_cli.gradients.gps_loss`), in the weights' dtype."""
    from ..gradients import gps_loss as two_view_loss

    dtype = next(model.parameters()).dtype
    return two_view_loss(model, batch["pixel_values"].to(dtype), batch["labels"], loss)


TASK = Task(
    name=IMAGE_CLASSIFICATION,
    data_kind="images",
    data_hint="an image folder (class sub-folders of images, or train/ and val/ splits)",
    hf_auto_class="AutoModelForImageClassification",
    hf_suffixes=("ForImageClassification", "ForImageClassificationWithTeacher"),
    build_model=build_model,
    discover=discover,
    loader=loader,
    stream=stream,
    forward=forward,
    loss=classification.loss,
    count=classification.count,
    hits=classification.hits,
    eval_sums=classification.eval_sums,
    summarize=classification.summarize,
    real_tokens=real_tokens,
    gps_loss=gps_loss,
    check_select=data.check_selectable,
    training_data=training_data,
    data_options=("dataset_format",),
)
