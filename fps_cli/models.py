"""Model loading: timm names (with pretrained tags), ``hf-hub:``, ``local-dir:``, local checkpoints, and Hugging Face
transformers models (``hf:``, in :mod:`.hf`).

Pretrained weights are checked before timm is asked for them: if they are not in the local cache and the hub
cannot be reached (or ``offline`` is set), loading fails at once with one message naming the model and the
ways out, instead of huggingface_hub's retry loop.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ModelError
from .hf import canonical_name, create_hf_model, is_hf_name
from .hf import save_hf_pretrained as save_hf_pretrained  # re-exported: the merge command's writer for hf: models
from .hub import ModelSpec as ModelSpec  # re-exported: where every caller has found it
from .hub import ensure_available, hf_cached, hub_offline, is_offline, quiet_hub, ways_out_hint
from .hub import load_checkpoint as load_checkpoint  # re-exported
from .hub import read_state_dict as read_state_dict  # re-exported
from .outputs import recover

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _check_model_name(name: str) -> None:
    import timm

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if not timm.is_model(name) and "/" in name:
        # A hub repo id such as timm/vit_base_patch16_224.augreg_in21k: timm loads those with the hf-hub: prefix.
        tail = name.rsplit("/", 1)[1]
        timm_name = f", or the timm name {tail}" if timm.is_model(tail) else ""
        # Outside timm's own organisation a repo is as likely a transformers model (google/vit-base-patch16-224).
        other = not name.startswith("timm/")
        kind = " (timm weights)" if other else ""
        transformers = f"; a transformers model is hf:{name} (pip install 'fps-cli[hf]')" if other else ""
        raise ModelError(
            f"unknown model {name!r}; a Hugging Face hub repo is named hf-hub:{name}{kind}{timm_name}{transformers}"
        )
    if not timm.is_model(name):
        arch = name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
        if timm.is_model(arch):
            tags = [m for m in timm.list_pretrained(f"{arch}.*")][:5]
            hint = f"; known tags: {', '.join(tags)}" if tags else "; it has no pretrained tags"
        raise ModelError(f"unknown model {name!r}{hint}")


def _pretrained_source(name: str, kwargs: dict[str, Any]) -> tuple[str, str, dict]:
    """Where timm would load ``name``'s weights from: (``hf-hub`` | ``url`` | ``file``, location, cfg)."""
    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        # An architecture without a tag resolves to its default pretrained tag.
        import timm

        tags = timm.list_pretrained(f"{name}.*")
        if not tags:
            raise ModelError(f"{name} has no pretrained weights in timm. {ways_out_hint(name)}")
        cfg = get_pretrained_cfg(tags[0])
    return (*_resolve_pretrained_source(cfg.to_dict()), cfg.to_dict())


def _hf_weights_ready(repo: str, offline: bool, name: str, resolved: str | None = None) -> bool:
    """Whether the hub repo's weights are cached (True: load from the cache only); raises if they cannot be had.
    The message names the exact repo to prefetch (a plain timm name resolves to its default tag's repo)."""
    where = f" (the tag {resolved}, hub repo {repo})" if resolved else f" (hub repo {repo})"
    cached = hf_cached(repo, HF_WEIGHT_FILES)
    return ensure_available("pretrained weights", repo, cached, offline, name, ways_out_hint(name, repo), where)


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the model ``spec`` describes, on the CPU, in eval mode, for its task (:func:`fps_cli.tasks.resolve_task`:
    ``spec.task``, or what the model's config says).

    Raises:
        ModelError: unknown name, unreachable or missing weights, a checkpoint that does not fit.
    """
    from .tasks import resolve_task

    return resolve_task(spec).build_model(spec)


def create_image_model(spec: ModelSpec) -> nn.Module:
    """Build the image classifier ``spec`` describes (a timm model, or an ``hf:`` image classifier), on the CPU, in
    eval mode.

    Raises:
        ModelError: unknown name, unreachable or missing weights, a checkpoint that does not fit.
    """
    if is_hf_name(spec.name):
        return create_hf_model(spec)
    import timm

    _check_model_name(spec.name)
    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    offline = is_offline(spec.offline)
    pretrained = spec.pretrained and spec.checkpoint is None

    cache_only = offline
    if spec.name.startswith("hf-hub:"):
        repo = spec.name[len("hf-hub:") :]
        cache_only = ensure_available("the model config", repo, hf_cached(repo, ("config.json",)), offline, spec.name)
        if pretrained:
            cache_only = _hf_weights_ready(repo, offline, spec.name) and cache_only
    elif spec.name.startswith("local-dir:"):
        folder = Path(spec.name[len("local-dir:") :]).expanduser()
        recover(folder)  # a group write killed half-way in the folder reads as all old (outputs.py)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{spec.name}: {folder} has no config.json (a timm local-dir: folder needs one)")
        cache_only = True
    elif pretrained:
        source, location, cfg = _pretrained_source(spec.name, kwargs)
        if source == "hf-hub":
            resolved = "." not in spec.name and cfg.get("tag")
            cache_only = _hf_weights_ready(location, offline, spec.name, resolved or None)
        elif source == "url":
            from timm.models._hub import get_cache_dir

            cached = (Path(get_cache_dir()) / os.path.basename(urlparse(location).path)).is_file()
            cache_only = ensure_available("pretrained weights", location, cached, offline, spec.name)
        elif source == "file":
            if not Path(location).is_file():
                raise ModelError(f"pretrained file {location} for {spec.name} does not exist")
        else:
            raise ModelError(f"{spec.name} has no pretrained weights in timm. {ways_out_hint(spec.name)}")

    try:
        with quiet_hub(), hub_offline(cache_only):
            model = timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "img_size" in str(e):
            raise ModelError(f"{spec.name} does not accept --img-size: {e}") from None
        raise
    except (OSError, RuntimeError) as e:
        # Anything the pre-flight checks could not foresee (a partial cache, a hub error): one line, no page.
        raise ModelError(f"could not load {spec.name}: {str(e).splitlines()[0]}. {ways_out_hint(spec.name)}") from None

    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model.eval()


def model_name(name: str) -> str:
    """The model name to record in a file's provenance (a local ``hf:`` folder made absolute)."""
    return canonical_name(name) if is_hf_name(name) else name


def model_num_classes(model: nn.Module) -> int | None:
    """The head's class count: timm's ``num_classes``, or transformers' ``config.num_labels``."""
    n = getattr(model, "num_classes", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "num_labels", None)
    return n


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a forward pass: the tensor itself (timm), or ``output.logits`` (transformers' output objects)."""
    logits = getattr(output, "logits", None)
    return output if logits is None else logits
