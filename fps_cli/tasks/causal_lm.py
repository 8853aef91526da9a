"""Causal language modelling: data as LLM fine-tuners write it, labels, the loss and perplexity, the statistics pass.

**Data** (TRL's SFT field names). ``--data`` is a JSON Lines file, a ``.txt`` file, or a folder of them (read in
sorted order; ``train.jsonl`` with ``val.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` beside it gives the splits).
Each JSON Lines record is one of:

- ``{"text": ...}``: language modelling; the loss covers every token;
- ``{"prompt": ..., "completion": ...}``: the loss covers the completion (and the end-of-sequence token) only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template; the loss
  covers the assistant turns only.

A ``.txt`` file gives one ``text`` record per non-empty line (as the ``datasets`` library's ``text`` loader does).
``--train-on-inputs`` puts every token in the loss. Token ids are truncated to ``--max-length`` (default 1024, TRL's);
``--packing`` concatenates the examples (each ended by the end-of-sequence token) and cuts the stream into rows of
exactly ``--max-length`` tokens (TRL's ``wrapped`` strategy: an example may attend to the one before it in its row).
Positions outside the loss carry the label ``-100`` (:data:`IGNORE_INDEX`), as in transformers.

**Assistant turns.** A chat template with ``{% generation %}`` marks them itself
(``apply_chat_template(..., return_assistant_tokens_mask=True)``). Otherwise each assistant turn is found by
rendering the conversation up to it with ``add_generation_prompt=True`` and through it: the text between the two is
the turn (its end-of-turn marker included). A template for which the first rendering is not a prefix of the second
cannot mark assistant turns, and that is an error, not a silently empty loss.

Errors name the file and the line: invalid JSON, a record with none of the known fields, an empty completion, an
example with nothing left to learn after truncation, a conversation with no assistant turn, ``messages`` with a
tokenizer that has no chat template. A tokenizer without a pad token gets ``pad = eos``, as transformers users set
it, with a notice (:func:`ensure_pad_token`).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import dataset_loader
from ..errors import DataError, ModelError
from . import BatchStream, Task, TaskData, next_token
from .next_token import IGNORE_INDEX, HeadInput, next_token_sums

Batch = dict[str, Any]
CAUSAL_LM = "causal-lm"
DATA_OPTIONS = ("max_length", "packing", "train_on_inputs", "val_split")

DEFAULT_MAX_LENGTH = 1024  # TRL's SFTConfig.max_length
DATA_SUFFIXES = (".jsonl", ".txt")
KINDS = ("text", "prompt-completion", "messages")
VAL_STEMS = ("val", "validation", "test")


@dataclass(frozen=True)
class Record:
    """One training example as read: its kind, its fields, and where it was read (``file:line``).

    Attributes:
        kind: ``text``, ``prompt-completion`` or ``messages``.
        fields: ``{"text": str}``, ``{"prompt": str, "completion": str}`` or ``{"messages": [{role, content}]}``.
        where: ``file:line``, for messages.
    """

    kind: str
    fields: Mapping[str, Any]
    where: str


@dataclass(frozen=True)
class Tokenized:
    """One example as token ids and labels (``-100`` where the loss does not count), of equal length."""

    input_ids: list[int]
    labels: list[int]
    where: str

    @property
    def learned(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# ------------------------------------------------------------------------------------------------------ reading


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object", str: "a string"}[
        type(value)
    ]


def parse_record(record: Any, where: str) -> Record:
    """A JSON object as a :class:`Record`.

    Raises:
        DataError: not an object, none of the known fields, a field of the wrong type, an empty completion, a
            ``messages`` list that is not ``[{role, content}]``.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON object expected, got {_kind(record)}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] is not an object with string 'role' and 'content'")
        return Record("messages", {"messages": messages}, where)
    if "prompt" in record or "completion" in record:
        for name in ("prompt", "completion"):
            if name not in record:
                raise DataError(f"{where}: a 'prompt' needs a 'completion' and a 'completion' a 'prompt'; no {name!r}")
            if not isinstance(record[name], str):
                raise DataError(f"{where}: field {name!r} is {_kind(record[name])}, not a string")
        if not record["completion"].strip():
            raise DataError(f"{where}: empty completion: nothing to learn from this example; drop it or fill it in")
        return Record("prompt-completion", {"prompt": record["prompt"], "completion": record["completion"]}, where)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text' is {_kind(record['text'])}, not a string")
        if not record["text"].strip():
            raise DataError(f"{where}: empty 'text': nothing to learn from this example; drop it")
        return Record("text", {"text": record["text"]}, where)
    have = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(
        f"{where}: none of the known fields (fields: {have}); a record holds 'text', 'prompt' and 'completion', or "
        "'messages' (TRL's SFT formats)"
    )


def read_jsonl(path: Path) -> list[Record]:
    """Every record of a JSON Lines file (blank lines skipped).

    Raises:
        DataError: a line that is not valid JSON (file and line named), a bad record (:func:`parse_record`).
    """
    records = []
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno}); a JSON Lines file holds one object "
                    "per line"
                ) from None
            records.append(parse_record(value, f"{path}:{number}"))
    return records


def read_txt(path: Path) -> list[Record]:
    """One ``text`` record per non-empty line of a text file."""
    with _open(path) as f:
        return [
            Record("text", {"text": line.rstrip("\n")}, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()
        ]


class _open:
    """``open`` for reading UTF-8 text, with the failures as :class:`DataError` naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        try:
            self.file = self.path.open(encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror or e}") from None
        return _Lines(self.file, self.path)

    def __exit__(self, *exc) -> None:
        self.file.close()


class _Lines:
    def __init__(self, file, path: Path) -> None:
        self.file, self.path = file, path

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.file
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_file(path: Path) -> list[Record]:
    """The records of one ``.jsonl`` or ``.txt`` file."""
    return read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_txt(path)


def data_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """The training files and validation files of ``--data``.

    A file is the training data. In a folder, ``train.*`` with ``val.*`` / ``validation.*`` / ``test.*`` beside it
    are the two splits; without a ``train.*``, every ``.jsonl`` / ``.txt`` file (sorted) is training data.

    Raises:
        DataError: no such file or folder, a file of another kind, a folder without data files.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data {root} does not exist")
    if root.is_file():
        if root.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{root} is not a JSON Lines or text file (expected {', '.join(DATA_SUFFIXES)})")
        return [root], []
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    train = [p for p in files if p.stem == "train"]
    if train:
        val = [p for stem in VAL_STEMS for p in files if p.stem == stem][:1]
        return train, val
    if not files:
        raise DataError(f"no .jsonl or .txt file in {root}; language-model data is JSON Lines or plain text")
    return files, []


def read_records(files: Iterable[Path]) -> list[Record]:
    """Every record of ``files``, in order.

    Raises:
        DataError: a problem in a file, or no record at all.
    """
    files = list(files)
    records = [r for f in files for r in read_file(f)]
    if not records:
        raise DataError(f"{', '.join(map(str, files))}: no examples (every line is empty)")
    return records


# ---------------------------------------------------------------------------------------------------- tokenizing


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token the end-of-sequence token as its pad token, as transformers users do
    (padding positions are masked out of attention and of the loss, so which id fills them does not matter).

    Returns:
        A notice saying so, or None when the tokenizer had a pad token.

    Raises:
        ModelError: the tokenizer has neither a pad nor an end-of-sequence token.
    """
    if tokenizer.pad_token_id is not None:
        return None
    if tokenizer.eos_token is None:
        raise ModelError(
            "the tokenizer has no pad token and no end-of-sequence token to pad with; set one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and save it beside the model"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return f"the tokenizer has no pad token: padding with its end-of-sequence token {tokenizer.eos_token!r}"


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _render(tokenizer: Any, messages: list, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, found by rendering prefixes.

    Raises:
        DataError: the template renders a prefix that the longer conversation does not start with (it cannot mark
            assistant turns).
    """
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if not through.startswith(before) or not text.startswith(through):
            raise DataError(
                f"{where}: the tokenizer's chat template cannot mark assistant turns (rendering the conversation up "
                f"to turn {i} with add_generation_prompt=True is not a prefix of rendering it through turn {i}); put "
                "{% generation %}...{% endgeneration %} around the assistant content in the template, or train on "
                "every token with --train-on-inputs"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _messages_ids(tokenizer: Any, record: Record, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    messages = list(record.fields["messages"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{record.where}: 'messages' need a chat template, and the tokenizer has none; set "
            "tokenizer.chat_template and save it beside the model, or write the data as 'prompt' / 'completion' or "
            "'text'"
        )
    if not train_on_inputs and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where}: no assistant turn: nothing to learn from this conversation")
    if "{% generation %}" in tokenizer.chat_template.replace("{%- generation %}", "{% generation %}"):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        learned = list(out["assistant_masks"]) if not train_on_inputs else [1] * len(ids)
        return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned, strict=True)]
    if train_on_inputs:
        ids = _ids(tokenizer, _render(tokenizer, messages, False), False)
        return ids, list(ids)
    text, spans = assistant_spans(tokenizer, messages, record.where)
    # Each piece tokenized on its own, so that every token belongs to one side of a span's edge.
    ids: list[int] = []
    labels: list[int] = []
    start = 0
    for begin, end in [*spans, (len(text), len(text))]:
        for piece, learn in ((text[start:begin], False), (text[begin:end], True)):
            if piece:
                piece_ids = _ids(tokenizer, piece, False)
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
        start = end
    return ids, labels


def tokenize(tokenizer: Any, record: Record, max_length: int, train_on_inputs: bool = False) -> Tokenized:
    """Token ids and labels of one record, truncated to ``max_length``.

    ``text``: the tokenizer's ids (its special tokens, e.g. BOS) plus the end-of-sequence token, all learned.
    ``prompt-completion``: the prompt's ids (with special tokens), then the completion's and EOS, learned. ``messages``:
    the chat template's rendering, the assistant turns learned.

    Raises:
        DataError: nothing left to learn after truncation, and what :func:`_messages_ids` raises.
    """
    if record.kind == "text":
        ids = _with_eos(tokenizer, _ids(tokenizer, record.fields["text"], True))
        labels = list(ids)
    elif record.kind == "prompt-completion":
        prompt = _ids(tokenizer, record.fields["prompt"], True)
        completion = _with_eos(tokenizer, _ids(tokenizer, record.fields["completion"], False))
        ids = prompt + completion
        labels = (list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + completion
    else:
        ids, labels = _messages_ids(tokenizer, record, train_on_inputs)
    item = Tokenized(ids[:max_length], labels[:max_length], record.where)
    if item.learned == 0:
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        why = f"the loss starts at token {first}" if first is not None else "no token is in the loss"
        raise DataError(
            f"{record.where}: nothing left to learn after truncation to --max-length {max_length} ({len(ids)} "
            f"tokens; {why}); raise --max-length or shorten the prompt"
        )
    return item


def tokenize_all(
    tokenizer: Any, records: Sequence[Record], max_length: int, train_on_inputs: bool = False
) -> tuple[list[Tokenized], int]:
    """Every record tokenized; also how many were truncated."""
    items, truncated = [], 0
    for record in records:
        item = tokenize(tokenizer, record, max_length, train_on_inputs)
        items.append(item)
        # A truncated example fills max_length exactly and rarely ends with EOS; count those that lost tokens.
        truncated += len(item.input_ids) == max_length and item.input_ids[-1] != tokenizer.eos_token_id
    return items, truncated


def pack(items: Sequence[Tokenized], max_length: int) -> list[Tokenized]:
    """The examples concatenated and cut into rows of ``max_length`` tokens (the last row may be shorter). Rows with
    nothing to learn (every label ``-100``) are dropped."""
    ids = [t for item in items for t in item.input_ids]
    labels = [t for item in items for t in item.labels]
    rows = []
    for start in range(0, len(ids), max_length):
        row = Tokenized(ids[start : start + max_length], labels[start : start + max_length], f"packed row {len(rows)}")
        if row.learned:
            rows.append(row)
    return rows


def collate(items: Sequence[Tokenized], pad_id: int) -> Batch:
    """A batch padded on the right to its longest row: ``input_ids`` (pad ``pad_id``), ``attention_mask`` (0 on
    padding) and ``labels`` (``-100`` on padding)."""
    longest = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ loss and metrics


def loss_sums(logits: Tensor | HeadInput, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood (fp32 logits, fp64 sum) and the number of tokens it counts: position
    ``t`` predicts label ``t + 1``; labels ``-100`` do not count. ``logits`` may be the chunked path's
    :class:`~.next_token.HeadInput` (the logits made a chunk at a time)."""
    if isinstance(logits, HeadInput):
        nll, tokens, _ = next_token_sums(logits, labels)
        return nll, tokens
    shifted = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll.double(), (shifted != IGNORE_INDEX).sum()


def loss(logits: Tensor, batch: Batch) -> Tensor:
    """The training loss: mean next-token NLL over the counted tokens of the batch."""
    total, count = loss_sums(logits, batch["labels"])
    return total.float() / count.clamp(min=1)


def summarize(sums: Mapping[str, float]) -> dict[str, Any]:
    """Mean NLL per counted token and perplexity (``exp`` of it) from summed ``nll`` and ``tokens``."""
    tokens = int(sums.get("tokens", 0))
    if tokens == 0:
        return {"tokens": 0}
    mean = float(sums["nll"]) / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}


def statistics_forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """The forward of fps's statistics pass: ``input_ids`` and ``attention_mask`` only, and, where the model takes
    ``logits_to_keep``, the logits of the last position only (``lm_head`` is no candidate, so the
    ``[batch, seq, vocab]`` logits would be the pass's largest tensor and serve nothing)."""
    kwargs: dict[str, Tensor] = {"input_ids": batch["input_ids"]}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


# ------------------------------------------------------------------------------------------------------ the task


def build_model(spec: Any) -> nn.Module:
    """An ``hf:`` ``AutoModelForCausalLM`` with its tokenizer (kept on the model, written beside merged weights).

    Raises:
        ModelError: not an ``hf:`` model, a folder without tokenizer files, or what
            :func:`fps_cli.hf.create_hf_model` raises.
    """
    from ..hf import create_hf_model
    from .text_classification import TOKENIZER_FILES, _load_tokenizer

    if not spec.name.startswith("hf:"):
        raise ModelError(f"{CAUSAL_LM} needs an hf: model (a transformers folder or hub id), not {spec.name}")
    folder = Path(spec.name[len("hf:") :]).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{spec.name}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); a language model "
            "needs its tokenizer: save it there with tokenizer.save_pretrained(folder)"
        )
    return create_hf_model(
        spec,
        auto_class="AutoModelForCausalLM",
        task=CAUSAL_LM,
        load_processor=_load_tokenizer,
        processor_file="tokenizer_config.json",
    )


@dataclass
class TextSplit:
    """One split of language-model data, shaped like the other tasks' splits (no classes).

    Attributes:
        root: the file or folder it was read from.
        samples: ``(Record, 0)`` in file order (the 0 stands for a class: language modelling has none).
        files: the files read.
        name: how the split is named in messages (its file, or the files' folder).
    """

    root: Path
    samples: list[tuple[Record, int]]
    files: list[Path]
    name: str = ""
    classes: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return False


def _split(root: Path, records: list[Record], files: list[Path]) -> TextSplit:
    name = files[0].name if len(files) == 1 else f"{len(files)} files in {root.name}"
    return TextSplit(root, [(r, 0) for r in records], files, name)


def discover(path: Any, data_options: Mapping[str, Any]) -> TaskData:
    """The training split (and the validation split, from ``val.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` or
    ``--val-split``) of ``--data``.

    Raises:
        DataError: what :func:`data_files` and :func:`read_records` raise; ``--val-split`` beside a validation file.
    """
    from .text_data import SPLIT_SEED, carve

    root = Path(path).expanduser()
    train_files, val_files = data_files(root)
    records = read_records(train_files)
    val_records = read_records(val_files) if val_files else None
    val_split = data_options.get("val_split")
    if val_split is not None:
        if val_records is not None:
            raise DataError(f"{root} has a validation file {val_files[0].name}; --val-split carves one from the rest")
        records, val_records = carve(records, val_split)
    train = _split(root, records, train_files)
    val = _split(root, val_records, val_files or train_files) if val_records else None
    layout = "jsonl" if all(f.suffix.lower() == ".jsonl" for f in train_files) else "text-files"
    provenance: dict[str, Any] = {"train_split": [str(f.resolve()) for f in train_files]}
    if val is not None:
        provenance["val_split"] = [str(f.resolve()) for f in (val_files or train_files)]
    if val_split is not None:
        provenance.update(carved=val_split, split_seed=SPLIT_SEED)
    return TaskData(train, val, None, layout, str(root.resolve()), provenance, "examples")


def training_data(path: Any, recorded: Mapping[str, Any], source: str, data_options: Mapping[str, Any]) -> Any:
    """The text ``fps train`` / ``fps eval`` read: ``path``, or the data the mask or delta records.

    Raises:
        DataError: nothing recorded and nothing given, or the recorded data is gone.
    """
    from . import dataset_of

    if path is None:
        path = recorded.get("data")
        if not path:
            raise DataError(f"{source} records no data; pass --data")
        if not Path(path).exists():
            raise DataError(f"data {path} recorded in {source} does not exist; pass --data")
    return dataset_of(TASK, path, data_options)


def tokenizer_of(model: nn.Module) -> Any:
    from ..hf import PROCESSOR_ATTR

    tokenizer = getattr(model, PROCESSOR_ATTR, None)
    if tokenizer is None or not callable(tokenizer):
        raise ModelError(f"{type(model).__name__} was built without its tokenizer (load it with fps_cli.create_model)")
    return tokenizer


class TokenizedLM(Dataset):
    """Examples tokenized once, in the main process (:func:`tokenize_all`).

    Attributes:
        items: one :class:`Tokenized` per example, in order.
        notes: what to report once (the pad token, how many examples were truncated).
    """

    def __init__(self, samples: Sequence[tuple[Record, int]], tokenizer: Any, options: Mapping[str, Any]) -> None:
        max_length = int(options.get("max_length") or DEFAULT_MAX_LENGTH)
        self.notes: list[str] = []
        notice = ensure_pad_token(tokenizer)
        if notice:
            self.notes.append(notice)
        records = [r for r, _ in samples]
        self.items, truncated = tokenize_all(tokenizer, records, max_length, bool(options.get("train_on_inputs")))
        if truncated:
            self.notes.append(
                f"{truncated} of {len(records)} examples are longer than --max-length {max_length} tokens and were "
                "truncated"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tokenized:
        return self.items[index]


def _collate(items: list[Tokenized], pad_id: int, pack_to: int | None) -> Batch:
    examples = len(items)  # before packing: the progress counts examples, not rows
    if pack_to is not None:
        items = pack(items, pack_to) or list(items)
    return {**collate(items, pad_id), "examples": examples}


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
    """A loader of padded token batches (``input_ids``, ``attention_mask``, ``labels``). With ``packing`` each batch's
    examples are concatenated and cut into rows of ``max_length`` tokens (so a batch holds at most ``batch_size``
    rows, and the samplers and shards of the other tasks work unchanged). Tokenized in the main process
    (``num_workers`` is not needed; ``img_size`` / ``augment`` do not apply); ``loading`` goes to
    :func:`fps_cli.data.dataset_loader`."""
    options = data_options or {}
    tokenizer = tokenizer_of(model)
    dataset = TokenizedLM(samples, tokenizer, options)
    pack_to = int(options.get("max_length") or DEFAULT_MAX_LENGTH) if options.get("packing") else None
    collate_fn = partial(_collate, pad_id=tokenizer.pad_token_id, pack_to=pack_to)
    return dataset_loader(dataset, collate_fn, **loading)


def stream(loader: DataLoader, skip_bad: bool = False) -> BatchStream:
    return BatchStream(loader)


def forward(model: nn.Module, batch: Batch) -> Tensor | HeadInput:
    """The decoder's last hidden state and the output layer, for the loss to make the logits a chunk at a time
    (:mod:`.next_token`: never the whole ``[batch, seq, vocab]``); the logits themselves for a model whose logits
    are more than its output layer on its decoder's output."""
    return next_token.forward(model, batch)


def task_loss(logits: Tensor, batch: Batch, criterion: Any = None) -> Tensor:
    """Mean next-token NLL over the counted tokens (the classification criterion and its label smoothing do not
    apply)."""
    return loss(logits, batch)


def count(batch: Batch) -> int:
    """Tokens the loss counts in the batch."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def hits(logits: Tensor, batch: Batch) -> Tensor:
    """Counted tokens whose next token is the top-1 prediction (next-token accuracy's numerator)."""
    if isinstance(logits, HeadInput):
        return next_token_sums(logits, batch["labels"])[2]
    labels = batch["labels"][:, 1:]
    return (logits[:, :-1].detach().argmax(-1).eq(labels) & (labels != IGNORE_INDEX)).sum()


def eval_sums(logits: Tensor, batch: Batch) -> dict[str, Tensor]:
    """Summed NLL (fp64), counted tokens and next-token top-1 hits of one batch."""
    nll, tokens = loss_sums(logits, batch["labels"])
    return {"nll": nll, "tokens": tokens, "correct1": hits(logits, batch)}


def summarize_metrics(sums: Mapping[str, float], num_classes: int | None = None) -> dict[str, Any]:
    """Mean NLL per counted token, perplexity (``exp`` of it), next-token top-1 accuracy in percent, tokens."""
    metrics = summarize(sums)
    if metrics.get("tokens"):
        metrics["top1"] = 100.0 * float(sums.get("correct1", 0.0)) / metrics["tokens"]
    return metrics


def real_tokens(batch: Batch) -> Tensor:
    """The real tokens, ``[batch, seq]``: padding never counts in the statistics."""
    return batch["attention_mask"].bool()


def gps_loss(model: nn.Module, batch: Batch, loss_name: str) -> Tensor:
    """GPS's loss for a language model: the next-token loss (there is no class feature for a contrastive loss)."""
    return loss(forward(model, batch), batch)


def roles(model: nn.Module, train_bias: bool):
    """fps's parameter roles in a causal LM: no task head (``lm_head`` is the pretrained output embedding, often
    tied to ``embed_tokens``), and the output embedding is no candidate: every ``nn.Linear`` of the decoder is."""
    from ..candidates import ParameterRoles, parameter_roles

    found = parameter_roles(model, train_bias=train_bias, head=[])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None:
        return found
    out_ids = {id(p) for p in output.parameters()}
    params = dict(model.named_parameters())
    dropped = [n for n in [*found.candidates, *found.fully_trainable] if id(params[n]) in out_ids]
    candidates = {n: m for n, m in found.candidates.items() if n not in dropped}
    fully = [n for n in found.fully_trainable if n not in dropped]
    return ParameterRoles(candidates, fully, [*found.frozen, *dropped], found.shapes)


TASK = Task(
    name=CAUSAL_LM,
    data_kind="text",
    data_hint="text for a language model (JSON Lines with text, prompt and completion, or messages; or .txt files)",
    hf_auto_class="AutoModelForCausalLM",
    hf_suffixes=("ForCausalLM",),
    build_model=build_model,
    discover=discover,
    loader=loader,
    stream=stream,
    forward=forward,
    loss=task_loss,
    count=count,
    hits=hits,
    eval_sums=eval_sums,
    summarize=summarize_metrics,
    real_tokens=real_tokens,
    gps_loss=gps_loss,
    check_select=lambda dataset: None,
    training_data=training_data,
    eval_keys=("nll", "tokens", "correct1"),
    data_options=DATA_OPTIONS,
    gps_augments=False,
    classifies=False,
    item_name=("example", "examples"),
    roles=roles,
    statistics_forward=statistics_forward,
)
