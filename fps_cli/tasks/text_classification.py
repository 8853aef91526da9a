"""Text classification: ``hf:`` ``AutoModelForSequenceClassification`` (BERT, RoBERTa, DeBERTa, MiniLM, ModernBERT...)
on labelled text (:mod:`.text_data`).

The model's own tokenizer (``AutoTokenizer``, kept on the model and written beside merged weights) turns each
example into token ids once, truncated to ``--max-length`` (default: the tokenizer's ``model_max_length``, at most
the model's ``max_position_embeddings``); how many examples were truncated is reported once. Batches are padded
to their longest example (dynamic padding): ``{"input_ids", "attention_mask", ["token_type_ids"], "labels"}``, and
the FPS statistics count the real tokens only (``attention_mask``), so padding never changes a score.

GPS for text: the supervised contrastive loss of GPS on the feature the classifier layer reads (the pooled
sentence feature: the input of the head's last ``nn.Linear``), with both views the same sequence (text has no
augmentation here; the model runs in eval mode, so no dropout), or ``--gps-loss ce``: cross-entropy on the logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import dataset_loader
from ..errors import DataError, ModelError
from . import TEXT_CLASSIFICATION, Batch, BatchStream, Task, TaskData, classification, dataset_of
from .text_data import discover_text

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DATA_OPTIONS = ("text_field", "label_field", "text_pair_field", "max_length", "val_split")


def _load_tokenizer(source: str, common: Mapping[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"hf:{source}: cannot load its tokenizer: {first}") from None


def build_model(spec: Any) -> nn.Module:
    """An ``hf:`` sequence classifier with a new head of ``spec.num_classes`` and its tokenizer.

    Raises:
        ModelError: not an ``hf:`` model, a folder without tokenizer files, or what :func:`fps_cli.hf.create_hf_model`
            raises.
    """
    from ..hf import create_hf_model

    if not spec.name.startswith("hf:"):
        raise ModelError(f"{TEXT_CLASSIFICATION} needs an hf: model (a transformers folder or hub id), not {spec.name}")
    folder = Path(spec.name[len("hf:") :]).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{spec.name}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); a text model needs "
            "its tokenizer: save it there with tokenizer.save_pretrained(folder)"
        )
    return create_hf_model(
        spec,
        auto_class="AutoModelForSequenceClassification",
        task=TEXT_CLASSIFICATION,
        load_processor=_load_tokenizer,
        processor_file="tokenizer_config.json",
    )


def discover(path: Any, data_options: Mapping[str, Any]) -> TaskData:
    """Labelled text (:func:`.text_data.discover_text`)."""
    train, val, record = discover_text(path, data_options)
    layout = record.pop("layout")
    location = str(Path(path).expanduser().resolve())
    return TaskData(train, val, None, layout, location, record, "texts")


def training_data(path: Any, recorded: Mapping[str, Any], source: str, data_options: Mapping[str, Any]) -> Any:
    """The labelled text ``fps train`` / ``fps eval`` read: ``path``, or the data the mask or delta records.

    Raises:
        DataError: nothing recorded and nothing given, the recorded data is gone, or a single class.
    """
    if path is None:
        path = recorded.get("data")
        if not path:
            raise DataError(f"{source} records no data; pass --data")
        if not Path(path).exists():
            raise DataError(f"data {path} recorded in {source} does not exist; pass --data")
    found = dataset_of(TASK, path, data_options)
    if len(found.train.classes) < 2:
        raise DataError(f"{found.train.root} has only one label ({found.train.classes[0]}); training needs two")
    return found


def tokenizer_of(model: nn.Module) -> Any:
    from ..hf import PROCESSOR_ATTR

    tokenizer = getattr(model, PROCESSOR_ATTR, None)
    if tokenizer is None or not callable(tokenizer):
        raise ModelError(f"{type(model).__name__} was built without its tokenizer (load it with fps_cli.create_model)")
    return tokenizer


def max_length_of(model: nn.Module, tokenizer: Any, max_length: int | None) -> int:
    """``--max-length``, or the tokenizer's ``model_max_length`` capped by the model's position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_length is not None:
        if max_length < 2:
            raise DataError(f"--max-length must be at least 2, got {max_length}")
        return max_length
    own = getattr(tokenizer, "model_max_length", None)
    candidates = [n for n in (own, limit) if isinstance(n, int) and 0 < n < 1_000_000]
    return min(candidates) if candidates else 512


class TokenizedText(Dataset):
    """Examples tokenized once, truncated to ``max_length``.

    Attributes:
        items: per example, its token ids (and token type ids) and label.
        truncated: how many examples were longer than ``max_length``.
        notes: what to report once (the truncation count).
    """

    def __init__(self, samples: list, tokenizer: Any, max_length: int) -> None:
        from ..hf import _quiet_transformers

        texts = [e.text for e, _ in samples]
        pairs = [e.pair for e, _ in samples] if samples and samples[0][0].pair is not None else None
        with _quiet_transformers():
            full = tokenizer(texts, pairs, truncation=False)["input_ids"] if samples else []
            encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length) if samples else {}
        self.truncated = sum(len(ids) > max_length for ids in full)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        self.items = [({k: encoded[k][i] for k in keys}, label) for i, (_, label) in enumerate(samples)]
        self.samples = samples
        self.notes = []
        if self.truncated:
            self.notes.append(
                f"{self.truncated} of {len(samples)} texts are longer than --max-length {max_length} tokens and were "
                "truncated"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[dict[str, list[int]], int]:
        return self.items[index]


def pad_collate(pad_id: int, right: bool = True):
    """Pads a batch to its longest sequence: ``input_ids`` with ``pad_id``, ``token_type_ids`` and
    ``attention_mask`` with 0."""

    def collate(items: list[tuple[dict[str, list[int]], int]]) -> Batch:
        longest = max(len(x["input_ids"]) for x, _ in items)
        batch: Batch = {}
        for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
            if key not in items[0][0]:
                continue
            rows = []
            for x, _ in items:
                pad = [fill] * (longest - len(x[key]))
                rows.append(x[key] + pad if right else pad + x[key])
            batch[key] = torch.tensor(rows, dtype=torch.long)
        mask = [[1] * len(x["input_ids"]) for x, _ in items]
        batch["attention_mask"] = torch.tensor(
            [m + [0] * (longest - len(m)) if right else [0] * (longest - len(m)) + m for m in mask], dtype=torch.long
        )
        batch["labels"] = torch.tensor([label for _, label in items], dtype=torch.long)
        return batch

    return collate


def loader(
    model: nn.Module,
    samples: list,
    purpose: str,
    *,
    data_options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    img_size: int | None = None,
    augment: bool = False,
    **loading: Any,
) -> DataLoader:
    """A loader of padded token batches (tokenized once, in the main process: ``num_workers`` is not needed; the image
    task's ``img_size`` / ``augment`` do not apply); ``loading`` goes to :func:`fps_cli.data.dataset_loader`."""
    tokenizer = tokenizer_of(model)
    max_length = max_length_of(model, tokenizer, (data_options or {}).get("max_length"))
    dataset = TokenizedText(samples, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = pad_collate(pad_id, getattr(tokenizer, "padding_side", "right") != "left")
    return dataset_loader(dataset, collate, **loading)


def stream(loader: DataLoader, skip_bad: bool = False) -> BatchStream:
    return BatchStream(loader)


def forward(model: nn.Module, batch: Batch) -> Tensor:
    """The logits of ``model(input_ids=..., attention_mask=..., token_type_ids=...)``."""
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits


def real_tokens(batch: Batch) -> Tensor:
    """The real tokens, ``[batch, seq]``: padding never counts in the statistics."""
    return batch["attention_mask"].bool()


def _classifier_input(model: nn.Module, batch: Batch) -> Tensor:
    """The feature the classifier layer reads (the input of the head's last ``nn.Linear``), ``[batch, dim]``."""
    from ..candidates import find_head

    linears = [m for h in find_head(model) for m in h.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear classifier layer; use --gps-loss ce")
    seen: list[Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        forward(model, batch)
    finally:
        handle.remove()
    feature = seen[-1]
    return feature[:, 0] if feature.dim() == 3 else feature.reshape(feature.shape[0], -1)


def gps_loss(model: nn.Module, batch: Batch, loss: str) -> Tensor:
    """GPS's loss on a text batch: ``supcon`` on the classifier's input feature (two identical views), or ``ce``."""
    from ..gradients import supcon_loss

    labels = batch["labels"]
    if loss == "ce":
        return F.cross_entropy(forward(model, batch).float(), labels)
    feature = _classifier_input(model, batch).float()  # [batch, dim]
    with torch.autocast(feature.device.type, enabled=False):
        return supcon_loss(torch.stack([feature, feature], dim=1), labels)


TASK = Task(
    name=TEXT_CLASSIFICATION,
    data_kind="text",
    data_hint="labelled text (JSON Lines or CSV with text and label fields, or class sub-folders of .txt files)",
    hf_auto_class="AutoModelForSequenceClassification",
    hf_suffixes=("ForSequenceClassification",),
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
    check_select=lambda dataset: None,
    training_data=training_data,
    data_options=DATA_OPTIONS,
    gps_augments=False,
    item_name=("text", "texts"),
)
