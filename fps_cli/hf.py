"""Hugging Face transformers models: ``--model hf:ID_OR_PATH`` (image classifiers here; a task module, such as
:mod:`fps_cli.tasks.text_classification`, passes its own Auto class and processor to :func:`create_hf_model`).

``hf:google/vit-base-patch16-224-in21k`` (a hub id, optionally ``@revision``) or ``hf:PATH`` (a local folder with a
``config.json``) is loaded with ``AutoModelForImageClassification`` and given a new head of ``num_classes``
(``num_labels``, ``ignore_mismatched_sizes=True``). Its image processor (``AutoImageProcessor``) is turned into the
timm data config the rest of the code uses (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
``crop_mode``) and set as the model's ``pretrained_cfg``, so timm's ``create_transform`` serves both model
families.

The model keeps its own parameter names (``vit.layers.0.attention.q_proj.weight``), so masks and deltas map 1:1
and merged weights load with ``from_pretrained`` (:func:`save_hf_pretrained`). Its head is every child module
outside ``getattr(model, model.base_model_prefix)`` (see :func:`fps_cli.candidates.find_head`).

transformers is an optional dependency (``pip install "fps-cli[hf]"``), imported only when an ``hf:`` model is
loaded. Pre-flight checks (cache, a quick TCP probe of the hub) run before it is imported, as for timm's hub
models, and no repository code runs unless ``trust_remote_code`` is set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .errors import ModelError
from .hub import (
    check_readable,
    ensure_available,
    hf_endpoint,
    hub_offline,
    is_offline,
    load_checkpoint,
    quiet_hub,
    unreachable_reason,
    ways_out_hint,
)
from .outputs import recover

if TYPE_CHECKING:
    from .hub import ModelSpec
    from .outputs import Transaction

HF_PREFIX = "hf:"
INSTALL_HINT = 'pip install "fps-cli[hf]"'
# Single-file and sharded weights, in the formats transformers reads.
HF_MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROCESSOR_FILE = "preprocessor_config.json"
# PIL resampling codes (transformers' PILImageResampling) -> timm interpolation names.
PIL_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Attribute holding the image processor a model was loaded with (written by save_hf_pretrained).
PROCESSOR_ATTR = "fps_image_processor"


def is_hf_name(name: str) -> bool:
    """Whether ``--model`` names a transformers model (``hf:ID_OR_PATH``)."""
    return name.startswith(HF_PREFIX)


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (duck-typed, so transformers is not imported)."""
    return hasattr(model, "config") and hasattr(model, "base_model_prefix") and hasattr(model, "save_pretrained")


def _require_transformers(name: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(f"{name} is a Hugging Face transformers model, but transformers is missing: {INSTALL_HINT}")


def _source(name: str) -> tuple[str, str | None, bool]:
    """``(folder or repo id, revision, is_local)`` of an ``hf:`` name.

    An existing folder wins over a hub id of the same spelling, as in transformers.
    """
    source = name[len(HF_PREFIX) :]
    if not source:
        raise ModelError("--model hf: needs a hub id or a folder, e.g. hf:google/vit-base-patch16-224-in21k")
    folder = Path(source).expanduser()
    if folder.is_dir():
        recover(folder)  # a group write killed half-way in the folder reads as all old (outputs.py)
        check_readable(folder, name)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{name}: {folder} has no config.json (save the model with save_pretrained)")
        return str(folder), None, True
    if source.startswith((".", "/", "~")) or folder.exists():
        raise ModelError(f"{name}: there is no folder {source}")
    repo, _, revision = source.partition("@")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError:
        raise ModelError(f"{name}: {source} is neither a folder nor a Hugging Face hub id (org/name)") from None
    return repo, revision or None, False


def canonical_name(name: str) -> str:
    """The name to record in provenance: a local ``hf:`` folder becomes absolute, so files work from any cwd."""
    source = name[len(HF_PREFIX) :]
    folder = Path(source).expanduser()
    if source and folder.is_dir():
        return HF_PREFIX + str(folder.resolve())
    return name


def _known_in_cache(repo: str, revision: str | None, filename: str) -> bool:
    """The file is cached, or the cache records that the repository has no such file."""
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(repo, filename, revision=revision) is not None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report, progress bars or warnings from transformers while loading or saving."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def create_hf_model(
    spec: ModelSpec,
    *,
    auto_class: str = "AutoModelForImageClassification",
    task: str = "image-classification",
    load_processor: Callable[[str, Mapping[str, Any]], Any] | None = None,
    processor_file: str = PROCESSOR_FILE,
) -> nn.Module:
    """Build the transformers model ``spec`` names (``hf:ID_OR_PATH``), on the CPU, in eval mode, in fp32.

    Args:
        spec: the model.
        auto_class: the transformers Auto class of the task (a task module passes its own).
        task: the task's name, for messages.
        load_processor: ``(source, from_pretrained kwargs) -> processor``, kept on the model (``PROCESSOR_ATTR``)
            and written by :func:`save_hf_pretrained`; default: the image processor (which also gives the timm data
            config of the transforms).
        processor_file: the processor's file, fetched when the hub answers and the cache lacks it.

    Raises:
        ModelError: transformers missing, unreachable or missing files, remote code not allowed, not a model of
            ``auto_class``, pretrained weights that do not fit (other than the head).
    """
    image = load_processor is None
    load_processor = load_processor or _load_processor
    name = spec.name
    _require_transformers(name)
    source, revision, local = _source(name)
    offline = is_offline(spec.offline)
    pretrained = spec.pretrained and spec.checkpoint is None
    cache_only = True
    if not local:
        config_ways_out = (
            f"Ways out: pass --model hf:PATH with a local folder holding config.json (save_pretrained), or run once "
            f"with network access so the Hugging Face cache (HF_HOME) holds {source}."
        )
        cached = _known_in_cache(source, revision, "config.json")
        cache_only = ensure_available("the model config", source, cached, offline, name, ways_out=config_ways_out)
        if pretrained:
            cached = any(_known_in_cache(source, revision, f) for f in HF_MODEL_WEIGHT_FILES)
            cache_only = ensure_available("pretrained weights", source, cached, offline, name) and cache_only
        if cache_only and not offline and not _known_in_cache(source, revision, processor_file):
            # Only the image processor is missing: fetch it if the hub answers, else use the defaults.
            cache_only = unreachable_reason(hf_endpoint()) is not None

    import transformers
    from transformers import AutoConfig

    auto_model = getattr(transformers, auto_class)

    trust = spec.trust_remote_code
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust}
    try:
        with quiet_hub(), _quiet_transformers(), hub_offline(cache_only):
            config = AutoConfig.from_pretrained(source, **common)
            if spec.num_classes is not None:
                config.num_labels = spec.num_classes  # a new id2label / label2id when the count changes
            if spec.img_size is not None and hasattr(config, "image_size"):
                config.image_size = spec.img_size
            if pretrained:
                model, info = auto_model.from_pretrained(
                    source, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **common
                )
            else:
                model, info = auto_model.from_config(config, trust_remote_code=trust), None
            processor = load_processor(source, common)
    except ValueError as e:
        message = str(e)
        if "trust_remote_code" in message:
            raise ModelError(
                f"{name} needs code from its repository to load; pass --trust-remote-code if you trust it"
            ) from None
        if "Unrecognized configuration class" in message or "Unrecognized model" in message:
            raise ModelError(
                f"{name} is not a {task} model transformers knows ({auto_class}): {_one_line(e)}"
            ) from None
        raise ModelError(f"could not load {name}: {_one_line(e)}") from None
    except (OSError, RuntimeError, ImportError, KeyError) as e:
        # Anything the pre-flight checks could not foresee (a partial cache, a hub error): one line, no page.
        raise ModelError(f"could not load {name}: {_one_line(e)}. {ways_out_hint(name)}") from None

    if info is not None:
        _check_loading_info(model, info, name, spec.img_size)
    model = model.float()  # transformers may load a checkpoint's own dtype; the rest of fps works in fp32
    if image:
        # timm's data-config attribute: resolve_model_data_config reads it, so one transform path serves both
        # families.
        model.pretrained_cfg = data_config(processor, config)
    setattr(model, PROCESSOR_ATTR, processor)
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model.eval()


def _load_processor(source: str, common: Mapping[str, Any]) -> Any | None:
    """The model's image processor, or ``None`` when it has none (the transforms then use timm's defaults)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, **common)
    except (OSError, ValueError, KeyError):
        return None


def _check_loading_info(model: nn.Module, info: Mapping[str, Any], name: str, img_size: int | None) -> None:
    """Only the head may be new: a backbone tensor left randomly initialised is an error, not a warning."""
    from .candidates import find_head

    head_ids = {id(p) for h in find_head(model) for p in h.parameters()}
    head = {n for n, p in model.named_parameters() if id(p) in head_ids}
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in head)
    mismatched = sorted(
        f"{k}: checkpoint {list(old)} vs model {list(new)}"
        for k, old, new in info.get("mismatched_keys", ())
        if k not in head
    )
    problems = [f"missing tensor {k}" for k in missing] + mismatched
    if problems:
        hint = f" (--img-size {img_size} changes their shape; drop it or use --no-pretrained)" if img_size else ""
        raise ModelError(f"pretrained weights of {name} do not fit the model{hint}:\n  " + "\n  ".join(problems))


def _get(size: Any, key: str) -> Any:
    """A field of a processor's size (a dict in transformers 4, a ``SizeDict`` in 5)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _interpolation(resample: Any) -> str:
    if resample is None:
        return "bilinear"
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    return PIL_INTERPOLATIONS.get(int(value), "bilinear")


def data_config(processor: Any | None, config: Any) -> dict[str, Any]:
    """A timm data config that reproduces what ``processor`` does to an image.

    - ``size={height, width}`` resizes to exactly that size (``crop_mode="squash"``), then an optional center crop of
      ``crop_size`` (``crop_pct = crop / size``);
    - ``size={shortest_edge}`` resizes the shorter side, then center crops: to ``crop_size`` (CLIP, BiT) or, with the
      processor's ``crop_pct`` (ConvNeXt), to ``shortest_edge`` from ``shortest_edge / crop_pct``.

    With no processor, the input size is the config's ``image_size`` and the rest timm's defaults (bicubic, ImageNet
    mean / std, ``crop_pct`` 0.875).

    Args:
        processor: the model's image processor, or ``None``.
        config: the model's ``PretrainedConfig``.
    """
    channels = int(getattr(config, "num_channels", 3) or 3)
    image_size = getattr(config, "image_size", None) or 224
    side = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    if processor is None:
        return {"input_size": (channels, int(side[0]), int(side[-1]))}

    size = getattr(processor, "size", None) if getattr(processor, "do_resize", True) else None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    crop_hw = (_get(crop, "height"), _get(crop, "width"))
    height, width, shortest = _get(size, "height"), _get(size, "width"), _get(size, "shortest_edge")
    if height and width:
        mode = "squash"
        if all(crop_hw):
            hw, crop_pct = crop_hw, crop_hw[0] / height
        else:
            hw, crop_pct = (height, width), 1.0
    elif shortest:
        mode = "center"
        processor_crop_pct = getattr(processor, "crop_pct", None)
        if all(crop_hw):
            hw, crop_pct = crop_hw, crop_hw[0] / shortest
        elif processor_crop_pct and shortest < 384:  # ConvNeXt: resize to shortest / crop_pct, crop shortest
            hw, crop_pct = (shortest, shortest), float(processor_crop_pct)
        else:  # ConvNeXt at >= 384 warps to a square; others keep the aspect ratio (a square crop here)
            hw, crop_pct, mode = (shortest, shortest), 1.0, "squash" if processor_crop_pct else "center"
    else:
        hw, crop_pct, mode = (int(side[0]), int(side[-1])), 1.0, "squash"

    if getattr(processor, "do_normalize", True):
        mean = tuple(float(m) for m in processor.image_mean)
        std = tuple(float(s) for s in processor.image_std)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return {
        "input_size": (channels, int(hw[0]), int(hw[1])),
        "mean": mean,
        "std": std,
        "interpolation": _interpolation(getattr(processor, "resample", None)),
        "crop_pct": float(crop_pct),
        "crop_mode": mode,
    }


def save_hf_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    labels: Sequence[str] | None = None,
    image_processor: Any | None = None,
    force: bool = False,
    tx: Transaction | None = None,
) -> Path:
    """Write a transformers ``save_pretrained`` folder: ``config.json`` (with the new ``num_labels``),
    ``model.safetensors`` and the image processor's ``preprocessor_config.json``.

    ``AutoModelForImageClassification.from_pretrained(folder)`` loads it, and so does ``--model hf:FOLDER``. The
    files are written through :mod:`.outputs`: a new folder is staged under a temporary name and renamed into
    place; an existing one (``force``) gets the new files in one group commit, and every other file in it stays.

    Args:
        model: a transformers model, e.g. from :func:`fps_cli.models.create_model` (no delta attached).
        folder: the output folder.
        state_dict: the weights to write (e.g. :func:`fps_cli.sparse.apply_delta` of ``model.state_dict()``);
            default: the model's own.
        labels: class names for the config's ``id2label`` / ``label2id`` (e.g. the delta's ``classes``).
        image_processor: default: the one the model was loaded with.
        force: write into an existing, non-empty ``folder`` (replacing only the files written here).
        tx: the command's group commit (its plan did the checks); default: a plan and commit of its own.

    Returns:
        The folder.

    Raises:
        OutputExistsError: ``folder`` exists and ``force`` is false, or is a file.
        ModelError: ``model`` is not a transformers model, has a delta attached, or ``labels`` do not fit its head.
    """
    from torch.nn.utils import parametrize

    folder = Path(folder)
    if not is_hf_model(model):
        raise ModelError(f"save_hf_pretrained needs a Hugging Face transformers model, not {type(model).__name__}")
    if state_dict is None and any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelError("the model has a sparse delta attached; merge it with apply_delta and pass state_dict=")
    config = model.config
    if labels is not None and len(labels) != config.num_labels:
        raise ModelError(f"{len(labels)} labels for a head of {config.num_labels} classes")
    if tx is None:
        from .outputs import OutputPlan

        plan = OutputPlan(force=force)
        plan.folder(folder, "folder", ("config.json", "model.safetensors", PROCESSOR_FILE))
        plan.check()
        with plan.transaction() as own:
            return save_hf_pretrained(
                model, folder, state_dict=state_dict, labels=labels, image_processor=image_processor, tx=own
            )
    processor = image_processor if image_processor is not None else getattr(model, PROCESSOR_ATTR, None)
    state = dict(state_dict if state_dict is not None else model.state_dict())

    def writer(staging: Path) -> None:
        with _quiet_transformers():
            model.save_pretrained(staging, state_dict=state)
            if processor is not None:
                processor.save_pretrained(staging)

    saved_labels = (config.id2label, config.label2id)
    try:
        if labels is not None:
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
        tx.write_folder(folder, writer)
    finally:
        config.id2label, config.label2id = saved_labels
    return folder
