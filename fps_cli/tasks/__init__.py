"""The task seam (DESIGN.md section 3): everything that differs between kinds of task, behind one small interface.

A task is a value, :class:`Task` (a frozen dataclass of functions), one module per task, registered in
:data:`TASKS`:

- :mod:`.image_classification`: timm models and ``hf:`` ``AutoModelForImageClassification``; image folders
  (:mod:`fps_cli.data`);
- :mod:`.text_classification`: ``hf:`` ``AutoModelForSequenceClassification``; class folders of ``.txt`` files,
  JSON Lines or CSV (:mod:`.text_data`).

A third task (causal language modelling, ``causal_lm.py``) plugs in the same way: build a :class:`Task` and add it to
:data:`TASKS`.

What a task provides:

- ``build_model(spec) -> nn.Module``: the model ``--model`` names, with a new head of ``spec.num_classes``, on the
  CPU, in eval mode (an ``hf:`` model through the task's ``hf_auto_class``).
- ``discover(data, data_options) -> dataset``: ``--data`` found and split: an object with ``train``, ``val``,
  ``location``, ``provenance()`` (what the header records about the splits), ``describe()`` and ``split(name)``
  (:class:`TaskData`; the image task's :class:`fps_cli.data.ImageFolder`). Each split has ``root``, ``samples`` (a
  list, one ``(example, label)`` per example), ``classes`` and ``labeled``. ``data_options`` are the task's own
  ``--data`` flags (text: ``text_field``, ``max_length``...; images: ``dataset_format``), a plain mapping that the
  mask records, so ``fps train`` finds the data as ``fps select`` did. ``check_select(dataset)`` refuses data a
  selection would misread; ``training_data(data, recorded, source, data_options)`` is the labelled data ``fps
  train`` / ``fps eval`` read (``data``, or what the file records).
- ``loader(model, samples, purpose, **loading) -> DataLoader`` and ``stream(loader, skip_bad) -> BatchStream``:
  batches are dicts like Hugging Face's: ``pixel_values`` (images) or ``input_ids`` / ``attention_mask`` (text),
  and ``labels``. ``purpose`` is ``select`` (the FPS pass), ``gps`` (GPS's two views), ``train`` or ``eval``.
  The stream counts ``seen`` examples and the ``skipped`` unreadable ones.
- ``forward(model, batch) -> Tensor``: the logits; ``loss(logits, batch, criterion)``: the training loss;
  ``count(batch)``: how many items the loss averages over; ``hits(logits, batch)``: how many of them are right
  (top-1); ``eval_sums(logits, batch)`` / ``summarize(sums, num_classes)``: the evaluation metrics (classification:
  top-1 / top-5 / loss; a language model would report loss and perplexity), summed over batches and ranks first.
- ``real_tokens(batch) -> BoolTensor | None``: which positions the FPS statistics count, ``[batch, seq]``
  (text: the ``attention_mask``, so padding never counts); ``None``: every position.
- ``gps_loss(model, batch, loss) -> Tensor``: the loss GPS backpropagates for its gradient scores.

The task is chosen from the model: timm names are image classifiers; for ``hf:`` models the config's
``architectures`` (``...ForImageClassification``, ``...ForSequenceClassification``) and, for a bare encoder such as
``BertModel``, which of transformers' Auto mappings knows its ``model_type``; ``--task`` forces one
(:func:`resolve_task`). Data of another task's kind is refused before the model is built (:func:`check_data`).

The core (statistics, scoring, selection, the sparse path, file formats, outputs) never imports this package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError, ModelError

if TYPE_CHECKING:
    from torch import Tensor, nn
    from torch.utils.data import DataLoader

    from ..hub import ModelSpec

Batch = dict[str, Any]

IMAGE_CLASSIFICATION = "image-classification"
TEXT_CLASSIFICATION = "text-classification"


@dataclass
class TaskData:
    """``--data`` as a task found it, with the interface of :class:`fps_cli.data.ImageFolder` (which the image task
    returns as it is): the training split, the validation split when there is one, where the data is
    (``location``), and what a file's header records about the splits (:meth:`provenance`).

    Each split has ``root``, ``samples`` (a list, one ``(example, label)`` per example), ``classes``, ``labeled`` and
    ``name``.
    """

    train: Any
    val: Any | None
    test: Any | None = None
    layout: str = ""
    location: str = ""
    records: dict[str, Any] = field(default_factory=dict)
    item_name: str = "examples"

    def split(self, name: str) -> Any:
        """The split ``name`` (``train``, ``val`` or ``test``).

        Raises:
            DataError: the data has no such split.
        """
        chosen = {"train": self.train, "val": self.val, "test": self.test or self.val}.get(name)
        if chosen is None:
            have = ", ".join(r for r in ("train", "val") if getattr(self, r) is not None)
            raise DataError(f"{self.location} has no {name!r} split; it has: {have}")
        return chosen

    def provenance(self) -> dict[str, Any]:
        """What a header records: ``layout``, and which files or folders train and validate."""
        return {"layout": self.layout, **self.records}

    def describe(self) -> str:
        """One line for the command's log: ``jsonl layout: train train.jsonl (800 texts), val ... (400 texts)``."""
        parts = [
            f"{role} {split.name} ({len(split.samples):,} {self.item_name})"
            for role, split in (("train", self.train), ("val", self.val))
            if split is not None
        ]
        return f"{self.layout} layout: " + ", ".join(parts)


class BatchStream:
    """Iterates a loader's dict batches and counts what it yielded (``seen``) and skipped (``skipped``)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.skipped: list[Path] = []
        self.seen = 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.seen += examples_in(batch)
            yield batch


def examples_in(batch: Batch) -> int:
    """How many examples a batch holds: its rows, or what a packing collate recorded (``examples``)."""
    return int(batch["examples"]) if "examples" in batch else len(batch["labels"])


@dataclass(frozen=True)
class Task:
    """One kind of task (see the module docstring for what each function does).

    Attributes:
        name: ``image-classification``, ``text-classification``, ...
        data_kind: what its ``--data`` holds, in words (``images``, ``text``).
        data_hint: what ``--data`` should be, for messages.
        hf_auto_class: the transformers Auto class that builds its ``hf:`` models.
        hf_suffixes: endings of a config's ``architectures`` entries that name this task.
        eval_keys: the keys of ``eval_sums`` (every rank reduces the same ones, even with no batch).
        data_options: the keys of ``data_options`` this task reads (the others are refused).
        gps_augments: GPS's two views are augmented (images); ``False``: both views are the same input (text).
        roles: ``(model, train_bias) -> ParameterRoles``: the candidates and fully trained parameters, where they
            differ from :func:`fps_cli.candidates.parameter_roles` (a causal LM: no head, the output embedding no
            candidate); ``None``: that function.
        statistics_forward: ``(model, batch)``: the forward of the FPS pass, where it can do less than ``forward``
            (a causal LM: no ``[batch, seq, vocab]`` logits); ``None``: ``forward``.
        item_name: what one example is called in messages, singular and plural.
        classifies: the data has classes and the head one output per class (training checks that the data's
            classes fit the head); ``False`` for a task without classes, such as language modelling.
    """

    name: str
    data_kind: str
    data_hint: str
    hf_auto_class: str
    hf_suffixes: tuple[str, ...]
    build_model: Callable[[ModelSpec], nn.Module]
    discover: Callable[[Path, Mapping[str, Any]], TaskData]
    loader: Callable[..., DataLoader]
    stream: Callable[[DataLoader, bool], BatchStream]
    forward: Callable[[nn.Module, Batch], Tensor]
    loss: Callable[[Tensor, Batch, Callable], Tensor]
    count: Callable[[Batch], int]
    hits: Callable[[Tensor, Batch], Tensor]
    eval_sums: Callable[[Tensor, Batch], dict[str, Tensor]]
    summarize: Callable[[Mapping[str, float], int], dict[str, Any]]
    real_tokens: Callable[[Batch], Tensor | None]
    gps_loss: Callable[[nn.Module, Batch, str], Tensor]
    check_select: Callable[[Any], None]
    training_data: Callable[[Any, Mapping[str, Any], str, Mapping[str, Any]], Any]
    eval_keys: tuple[str, ...] = ("correct1", "correct5", "loss", "samples")
    data_options: tuple[str, ...] = ()
    gps_augments: bool = True
    roles: Callable[[nn.Module, bool], Any] | None = None
    statistics_forward: Callable[[nn.Module, Batch], Any] | None = None
    classifies: bool = True
    item_name: tuple[str, str] = ("image", "images")


def task_roles(task: Task, model: nn.Module, train_bias: bool) -> Any:
    """The task's parameter roles (:attr:`Task.roles`, default :func:`fps_cli.candidates.parameter_roles`)."""
    from ..candidates import parameter_roles

    if task.roles is not None:
        return task.roles(model, train_bias)
    return parameter_roles(model, train_bias=train_bias)


def _registry() -> dict[str, Task]:
    from .image_classification import TASK as image
    from .text_classification import TASK as text

    tasks = {image.name: image, text.name: text}
    try:  # the causal language modelling task, where it exists
        from .causal_lm import TASK as causal_lm  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        tasks[causal_lm.name] = causal_lm
    return tasks


def task_names() -> tuple[str, ...]:
    """The registered tasks' names."""
    return tuple(_registry())


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ModelError: no such task.
    """
    tasks = _registry()
    if name not in tasks:
        raise ModelError(f"unknown task {name!r}; expected one of {', '.join(tasks)}")
    return tasks[name]


def hf_config(name: str) -> dict[str, Any] | None:
    """The ``config.json`` of an ``hf:`` model, read without transformers: from its folder, or from the Hugging Face
    cache for a hub id; ``None`` when it is not at hand (the model's own loading then fetches or refuses it)."""
    source = name[len("hf:") :]
    folder = Path(source).expanduser()
    path: Path | None = folder / "config.json" if folder.is_dir() else None
    if path is None and source:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = source.partition("@")
            cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # not a valid repo id: the model's own loading says so
            path = None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _auto_mapping_has(auto_class: str, model_type: str) -> bool:
    """Whether transformers' ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) knows ``model_type``."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return False
    names = {
        "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    }
    mapping = getattr(modeling_auto, names.get(auto_class, ""), None)
    return isinstance(mapping, Mapping) and model_type in mapping


def task_from_config(config: Mapping[str, Any]) -> str | None:
    """The task an ``hf:`` config names: by its ``architectures`` suffix, else the first task (in registry order)
    whose Auto class knows its ``model_type``; ``None`` when neither says."""
    tasks = _registry()
    for arch in config.get("architectures") or ():
        for task in tasks.values():
            if isinstance(arch, str) and arch.endswith(task.hf_suffixes):
                return task.name
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        for task in tasks.values():
            if _auto_mapping_has(task.hf_auto_class, model_type):
                return task.name
    return None


def resolve_task(spec: ModelSpec) -> Task:
    """The task of ``spec``'s model: ``spec.task`` when given (``--task``), image classification for timm models,
    and for ``hf:`` models what their config says (:func:`task_from_config`; image classification when the config is
    not at hand before loading).

    Raises:
        ModelError: an unknown ``--task``, or a task a timm model cannot do.
    """
    task_name = getattr(spec, "task", None)
    hf = spec.name.startswith("hf:")
    if task_name is not None:
        task = get_task(task_name)
        if not hf and task.name != IMAGE_CLASSIFICATION:
            raise ModelError(f"--task {task.name} needs an hf: model; {spec.name} is a timm image classifier")
        return task
    if hf:
        config = hf_config(spec.name)
        found = task_from_config(config) if config is not None else None
        if found is not None:
            return get_task(found)
    return get_task(IMAGE_CLASSIFICATION)


def data_kind(path: str | Path) -> str | None:
    """What ``path`` holds, in words, looking at file names only: ``images``, ``text`` (JSON Lines, CSV, ``.txt``
    files), or ``None`` (missing, empty, or nothing either task reads)."""
    from ..data import IMG_EXTENSIONS
    from .text_data import TEXT_FILE_SUFFIXES

    root = Path(path).expanduser()
    if root.is_file():
        return "text" if root.suffix.lower() in TEXT_FILE_SUFFIXES else None
    if not root.is_dir():
        return None
    images = texts = 0
    for i, p in enumerate(root.rglob("*")):
        if i > 5000:  # enough to tell
            break
        suffix = p.suffix.lower()
        if p.name.startswith("."):
            continue
        if suffix in IMG_EXTENSIONS:
            images += 1
        elif suffix in TEXT_FILE_SUFFIXES or suffix == ".txt":
            texts += 1
    if images == texts == 0:
        return None
    return "images" if images >= texts else "text"


def dataset_of(task: Task, data: Any, data_options: Mapping[str, Any]) -> Any:
    """``data`` discovered by ``task`` (an already discovered dataset, e.g. from the command line, as it is)."""
    if hasattr(data, "train") and hasattr(data, "provenance"):
        return data
    return task.discover(data, data_options)


def open_dataset(spec: ModelSpec, data: Any, data_options: Mapping[str, Any]) -> Any:
    """``--data`` for a selection with ``spec``'s model, discovered and checked before the model is built: the data
    options belong to the model's task, the data is of its kind, and the task accepts it for a selection.

    Raises:
        DataError: any of these does not hold (with the fix).
    """
    task = resolve_task(spec)
    options = {k: v for k, v in data_options.items() if v is not None}
    check_data_options(task, options)
    check_data(task, spec, data)
    dataset = dataset_of(task, data, options)
    task.check_select(dataset)
    return dataset


def check_data(task: Task, spec: ModelSpec, path: Any) -> None:
    """Refuse ``--data`` of another task's kind than the model's, naming both, before the model is built.

    Raises:
        DataError: the data is of another kind.
    """
    if not isinstance(path, (str, Path)):
        return  # already discovered by its task
    kind = data_kind(path)
    if kind is None or kind == task.data_kind:
        return
    other = "an image model (a timm name)" if kind == "images" else "a text model (hf: ...ForSequenceClassification)"
    article = "an" if task.name[0] in "aeiou" else "a"
    raise DataError(
        f"{spec.name} is {article} {task.name} model, but {path} holds {kind}; give it {task.data_hint}, or use "
        f"{other} (--task forces the task of an hf: model)"
    )


def check_data_options(task: Task, data_options: Mapping[str, Any]) -> None:
    """Refuse the data flags of another task (e.g. ``--text-field`` for an image model), naming them.

    Raises:
        DataError: a flag the task does not read was given.
    """
    foreign = sorted(k for k, v in data_options.items() if v is not None and k not in task.data_options)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise DataError(f"{flags}: not an option of {task.name} data")
