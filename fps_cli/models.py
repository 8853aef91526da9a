"""Model loading: timm names (with pretrained tags), ``hf-hub:``, ``local-dir:``, local checkpoints, and Hugging Face
transformers models (``hf:``, in :mod:`.hf`).

Pretrained weights are checked before timm is asked for them: if they are not in the local cache and the hub
cannot be reached (or ``offline`` is set), loading fails at once with one message naming the model and the
ways out, instead of huggingface_hub's retry loop.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ModelError
from .hf import canonical_name, create_hf_model, is_hf_name
from .hf import save_hf_pretrained as save_hf_pretrained  # re-exported: the merge command's writer for hf: models

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
NETWORK_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelSpec:
    """What to build.

    Attributes:
        name: a timm name (``vit_base_patch16_224.augreg_in21k``), ``hf-hub:org/name``, ``local-dir:PATH``, or
            ``hf:ID_OR_PATH`` for a transformers image-classification model.
        pretrained: load pretrained weights (ignored when ``checkpoint`` is given).
        checkpoint: local weights (safetensors, or a torch file read with ``weights_only=True``).
        num_classes: size of the new head; ``None`` keeps the model's own.
        img_size: input resolution override (models that take ``img_size``).
        offline: never touch the network.
        trust_remote_code: let an ``hf:`` model run code from its repository (never recorded in a file).
    """

    name: str
    pretrained: bool = True
    checkpoint: Path | None = None
    num_classes: int | None = None
    img_size: int | None = None
    offline: bool = False
    trust_remote_code: bool = False


def is_offline(spec_offline: bool = False) -> bool:
    return spec_offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _ways_out(name: str, repo: str | None = None) -> str:
    prefetch = f"prefetch them with `hf download {repo}` on a networked machine and copy HF_HOME here, " if repo else ""
    return (
        f"Ways out: {prefetch}pass --checkpoint FILE with local weights for {name}, use --no-pretrained for a randomly "
        "initialised model, or run once with network access so the Hugging Face cache (HF_HOME) holds them."
    )


def _check_model_name(name: str) -> None:
    import timm

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if not timm.is_model(name) and "/" in name:
        # A hub repo id such as timm/vit_base_patch16_224.augreg_in21k: timm loads those with the hf-hub: prefix.
        tail = name.rsplit("/", 1)[1]
        timm_name = f", or the timm name {tail}" if timm.is_model(tail) else ""
        raise ModelError(f"unknown model {name!r}; a Hugging Face hub repo is named hf-hub:{name}{timm_name}")
    if not timm.is_model(name):
        arch = name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
        if timm.is_model(arch):
            tags = [m for m in timm.list_pretrained(f"{arch}.*")][:5]
            hint = f"; known tags: {', '.join(tags)}" if tags else "; it has no pretrained tags"
        raise ModelError(f"unknown model {name!r}{hint}")


def _reachable(url: str) -> str | None:
    """None if a TCP connection to the URL's host opens within the probe timeout, else the reason."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=NETWORK_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def _hf_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return True
    return False


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub serve from its cache with no HTTP request (it reads this flag on every call)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Keep timm's and huggingface_hub's info / retry logging off the user's terminal while loading."""
    loggers = [logging.getLogger(n) for n in ("timm", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _ensure_available(
    what: str,
    repo_or_url: str,
    cached: bool,
    offline: bool,
    name: str,
    ways_out: str | None = None,
    where: str = "",
) -> bool:
    """Decide how to fetch ``what``: returns True to load from the cache only, or raises if it cannot be had."""
    if cached:
        return True
    ways_out = ways_out or _ways_out(name)
    if offline:
        raise ModelError(
            f"{what} for {name}{where}: not in the local cache, and offline mode (--offline / HF_HUB_OFFLINE) "
            f"forbids downloading. {ways_out}"
        )
    url = repo_or_url if "://" in repo_or_url else _hf_endpoint()
    reason = _reachable(url)
    if reason is not None:
        host = urlparse(url).hostname
        raise ModelError(f"cannot download {what} for {name}{where}: {host} is unreachable ({reason}). {ways_out}")
    return False


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
            raise ModelError(f"{name} has no pretrained weights in timm. {_ways_out(name)}")
        cfg = get_pretrained_cfg(tags[0])
    return (*_resolve_pretrained_source(cfg.to_dict()), cfg.to_dict())


def _hf_weights_ready(repo: str, offline: bool, name: str, resolved: str | None = None) -> bool:
    """Whether the hub repo's weights are cached (True: load from the cache only); raises if they cannot be had.
    The message names the exact repo to prefetch (a plain timm name resolves to its default tag's repo)."""
    where = f" (the tag {resolved}, hub repo {repo})" if resolved else f" (hub repo {repo})"
    cached = _hf_cached(repo, HF_WEIGHT_FILES)
    return _ensure_available("pretrained weights", repo, cached, offline, name, _ways_out(name, repo), where)


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the model ``spec`` describes, on the CPU, in eval mode.

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
        cache_only = _ensure_available("the model config", repo, _hf_cached(repo, ("config.json",)), offline, spec.name)
        if pretrained:
            cache_only = _hf_weights_ready(repo, offline, spec.name) and cache_only
    elif spec.name.startswith("local-dir:"):
        folder = Path(spec.name[len("local-dir:") :]).expanduser()
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
            cache_only = _ensure_available("pretrained weights", location, cached, offline, spec.name)
        elif source == "file":
            if not Path(location).is_file():
                raise ModelError(f"pretrained file {location} for {spec.name} does not exist")
        else:
            raise ModelError(f"{spec.name} has no pretrained weights in timm. {_ways_out(spec.name)}")

    try:
        with _quiet_hub(), _hub_offline(cache_only):
            model = timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "img_size" in str(e):
            raise ModelError(f"{spec.name} does not accept --img-size: {e}") from None
        raise
    except (OSError, RuntimeError) as e:
        # Anything the pre-flight checks could not foresee (a partial cache, a hub error): one line, no page.
        raise ModelError(f"could not load {spec.name}: {str(e).splitlines()[0]}. {_ways_out(spec.name)}") from None

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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch weight file safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # a raw pickle makes torch warn twice before it fails: one line is enough
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot read checkpoint {path}: {reason}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load local weights into ``model``; a head of another size is left freshly initialised.

    Raises:
        ModelError: listing every missing, unexpected and mis-shaped tensor at once.
    """
    from .candidates import find_head

    state = read_state_dict(path)
    own = dict(model.state_dict())
    head_ids = {id(p) for h in find_head(model) for p in h.parameters()}
    head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    unexpected, mismatched, skipped_head = [], [], []
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            if key in head_names:
                skipped_head.append(key)
            else:
                mismatched.append(f"{key} {list(value.shape)} vs {list(own[key].shape)}")
    missing = [k for k in own if k not in state and k not in head_names]
    kinds = (
        ("tensor the model lacks", "tensors the model lacks", unexpected),
        ("model tensor the checkpoint lacks", "model tensors the checkpoint lacks", missing),
        ("shape mismatch (checkpoint vs model)", "shape mismatches (checkpoint vs model)", mismatched),
    )
    problems = [
        f"{len(names)} {one if len(names) == 1 else many}: {', '.join(names[:5])}"
        + (f" … {len(names) - 5} more" if len(names) > 5 else "")
        for one, many, names in kinds
        if names
    ]
    if problems:
        size = sum(math.prod(v.shape) for v in state.values())
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise ModelError(
            f"checkpoint {path} does not fit the model:\n  checkpoint  {len(state)} tensors, {size:,} values\n"
            f"  model       {arch}, {len(own)} tensors, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters\n  " + "\n  ".join(problems)
        )
    keep = {k: v for k, v in state.items() if k not in skipped_head}
    model.load_state_dict(keep, strict=False)
