"""Where a model's weights come from: the Hugging Face hub (its cache, offline mode, a quick reachability probe)
and local checkpoint files, and :class:`ModelSpec`, which names them.

:mod:`.models` (timm) and :mod:`.hf` (transformers) both load through these helpers; neither imports the other's
internals, so the two never import each other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ModelError
from .outputs import recover

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
        task: the task the model is built for (``--task``; :mod:`fps_cli.tasks`); ``None``: as its config says.
    """

    name: str
    pretrained: bool = True
    checkpoint: Path | None = None
    num_classes: int | None = None
    img_size: int | None = None
    offline: bool = False
    trust_remote_code: bool = False
    task: str | None = None  # added by issue 21 (the task seam), last so positional construction still works


def is_offline(spec_offline: bool = False) -> bool:
    """``--offline`` (``spec_offline``), or ``HF_HUB_OFFLINE`` set in the environment."""
    return spec_offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def ways_out_hint(name: str, repo: str | None = None) -> str:
    """The end of every "cannot have the weights" message: the ways out (with ``repo``: the repo to prefetch)."""
    prefetch = f"prefetch them with `hf download {repo}` on a networked machine and copy HF_HOME here, " if repo else ""
    return (
        f"Ways out: {prefetch}pass --checkpoint FILE with local weights for {name}, use --no-pretrained for a randomly "
        "initialised model, or run once with network access so the Hugging Face cache (HF_HOME) holds them."
    )


def unreachable_reason(url: str) -> str | None:
    """None if a TCP connection to the URL's host opens within the probe timeout, else the reason."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=NETWORK_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def hf_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return True
    return False


def hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def hub_offline(enabled: bool) -> Iterator[None]:
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
def quiet_hub() -> Iterator[None]:
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


def ensure_available(
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
    ways_out = ways_out or ways_out_hint(name)
    if offline:
        raise ModelError(
            f"{what} for {name}{where}: not in the local cache, and offline mode (--offline / HF_HUB_OFFLINE) "
            f"forbids downloading. {ways_out}"
        )
    url = repo_or_url if "://" in repo_or_url else hf_endpoint()
    reason = unreachable_reason(url)
    if reason is not None:
        host = urlparse(url).hostname
        raise ModelError(f"cannot download {what} for {name}{where}: {host} is unreachable ({reason}). {ways_out}")
    return False


def torch_load_data(path: str | os.PathLike) -> object:
    """``torch.load`` of a file that must hold data, never code (``weights_only=True``), on the CPU.

    A raw pickle makes torch warn twice before it fails; the caller's one-line error is enough, so the warnings
    are silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch weight file safely (``weights_only=True``)."""
    path = Path(path)
    recover(path)  # a group write killed half-way in its folder reads as all old (outputs.py)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch_load_data(path)
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


def check_readable(folder: Path, name: str) -> None:
    """Refuse a model folder holding a weights or config file this process cannot read (transformers writes its
    files 0600, and then reports them as missing).

    Raises:
        ModelError: naming the file, the reason and the way out.
    """
    patterns = ("config.json", "preprocessor_config.json", "model*.safetensors", "pytorch_model*.bin", "*.index.json")
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        if path.is_file():
            try:
                path.open("rb").close()
            except OSError as e:
                raise ModelError(
                    f"{name}: cannot read {path}: {e.strerror or e} (make it readable, e.g. chmod a+r {path}, or run "
                    "fps as its owner)"
                ) from None
