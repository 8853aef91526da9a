"""Where the sparse fine-tuning mechanism lives: a frozen base plus a trainable 1-D delta per masked tensor.

For every partially trained parameter ``W`` (a mask entry), :func:`attach` registers a
:mod:`torch.nn.utils.parametrize` parametrization on its module, so that every access to ``module.weight``
computes ``W = W_base + scatter(delta)`` where ``W_base`` is the frozen original (``requires_grad=False``) and
``delta`` is a 1-D ``nn.Parameter`` of the values at the mask's flat indices, zero at first. The head and the
fully trainable tensors stay ordinary parameters with ``requires_grad=True``; everything else is frozen.

Only the deltas and the fully trainable tensors require gradients, so an optimizer built over
:meth:`SparseParams.parameters` holds state for exactly the trainable elements, and weight decay can never reach a
frozen weight.

**The sparse path (masked ``nn.Linear`` weights, the default).** Reading ``module.weight`` through the
parametrization would make autograd compute the *dense* ``[out, in]`` gradient of the effective weight in every
backward, and then gather the selected entries: a step would cost what a full fine-tuning step costs. So for a
masked weight of a plain ``nn.Linear`` the module's ``forward`` is swapped (an instance attribute, the way
accelerate's hooks do it; ``nn.Module.__call__`` still runs every forward hook and pre-hook around it) for
:func:`sparse_linear`, a custom autograd function that never reads ``module.weight``:

- forward ``y = x · (W_base ⊕ delta)ᵀ + b`` as one dense GEMM. ``W_base ⊕ delta`` is not a copy: the selected
  entries of the frozen base are overwritten in place with ``base + delta`` (O(selected) work), the GEMM runs, and
  the saved base values are written back, bit for bit (:meth:`SparseAdd.effective`, ``try/finally``). The
  effective entries are computed exactly as the parametrization computes them, so the outputs are bitwise
  those of the dense path. Under autocast the low-precision cast that any Linear makes is built the same way.
- backward: the input gradient ``dy · (W_base ⊕ delta)``, one dense GEMM (the same in-place overlay); the delta's
  gradient only at the selected entries, a sampled dense-dense product (for entry ``(i, j)`` the sum over tokens
  of ``dy[:, i] · x[:, j]``) over a CSR pattern built once per layer at attach time, in fp32 or fp64: on the CPU
  :mod:`fps_cli.sampled_product`'s compiled kernel, which reads ``dy`` and ``x`` row-major as they come (torch's
  CPU ``sparse_sampled_addmm`` copies both transposed for every layer; it is the fallback where no C compiler can
  build fps's); on CUDA ``torch.sparse.sampled_addmm`` (cuSPARSE's SDDMM, over chunks of tokens); on other devices
  the same sums gathered in chunks of selected entries. Bias gradient ``dy.sum``.

No dense weight-sized tensor is created in an fp32 training step (no effective-weight copy, none saved for
backward, no dense weight gradient); under bf16 / fp16 autocast only the transient low-precision cast any Linear
layer makes, rebuilt in the backward instead of being saved. A measured alternative, ``x · W_baseᵀ + x · Sᵀ``
with ``S`` a CSR matrix, costs a sparse matmul in the forward and another in the backward (a third and a sixth of
the dense GEMM at a ViT-B layer's shapes on the CPU, benchmarks/sparse_ops.py), where the overlay costs
O(selected).

**An activation's or a norm's output is rebuilt, not saved.** In a transformer MLP (timm's ``Mlp``: fc1 -> GELU ->
dropout -> norm -> fc2) fc2 would save its input, the GELU output (4·D per token), while GELU's own backward node
already keeps GELU's input (fc1's output, also 4·D). Likewise in a ViT block ``attn.qkv`` is fed ``norm1``'s output
and ``mlp.fc1`` ``norm2``'s (D per token each), while each LayerNorm's backward keeps its input (the residual
stream) and its weight and bias are parameters. :func:`attach` puts a forward hook (first in line, ``prepend=True``)
on every module of an exactly recomputable kind, :data:`RECOMPUTED_ACTIVATIONS` (``nn.GELU`` either approximation,
``nn.SiLU``, ``nn.Mish``; not in place; transformers' ``SiLUActivation``) and :data:`RECOMPUTED_NORMS`
(``nn.LayerNorm`` and timm's ``LayerNorm`` subclass, not with timm's "fast norm", which computes in low precision
under autocast; ``nn.RMSNorm`` on an fp32 / fp64 input; transformers' ``LlamaRMSNorm`` and its copies in other
models, told by their forward's code, on an fp32 input: on a low-precision input both keep an fp32 copy rather than
the input, so there is nothing to gain), forward not swapped, that marks the output tensor with ``(function,
tensors, version counters)`` (``F.layer_norm`` of input, weight and bias for a norm) — only with gradients on and an
input that requires them (so that autograd keeps it anyway) and every tensor in the output's dtype (no autocast cast
inside the module: under autocast LayerNorm runs in fp32 on the fp32 residual stream, GELU in the low precision of
fc1's output). When :func:`sparse_linear` is fed *that very tensor* (same object: a dropout with p > 0, a cast or
any op in between makes a new one) with no version changed, it saves the module's tensors instead of its input and
reruns the module in its backward: the same op on the same tensors in the same dtype, autocast off, so the bits are
those of the forward, then autocast's cast to the Linear's compute dtype if the forward made one (a norm's fp32
output fed to a bf16 Linear). Saved through ``save_for_backward``, so an in-place change of any of them before the
backward is rejected as autograd rejects any. This drops about a quarter of a ViT block's saved activations for fc2
and another D per token for each of qkv and fc1 (not block 0's qkv when nothing before it trains: its norm's input
needs no gradient, so nothing keeps it). Not covered: ReLU / Tanh / Sigmoid (their backward keeps their output, so
fc2's saved input costs nothing extra), activations and norms called as functions (no module to hook), BatchNorm, and
transformers' ``GELUActivation`` (its forward may be swapped for a hub kernel). :func:`detach` removes the hooks.

**A gated MLP's product** (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, Llama's MLP) is no module's output, so
:func:`sparse_linear` finds it through its autograd node: a ``MulBackward0`` whose operands are a recorded
activation output (matched by storage, shape and strides) and another tensor. The product's node keeps both
operands and the activation keeps ``gate``, so ``down_proj`` saves ``(gate, up)`` and rebuilds ``act(gate) * up``
(same operand order, same bits). Only without saved-tensor hooks other than fps's own (reading a node's saved
operands under checkpointing or offloading hooks would run them); see :func:`_product_recipe`.

The rebuilt tensor must be the one the Linear received, so a recipe is used only when no other code could have
changed it: while a model is attached, two global module hooks of fps's count the calls of modules that carry
forward hooks or pre-hooks of their own, and a recipe recorded before such a call (a hook on the norm itself, on a
``Dropout(0)`` or ``Identity`` in between, a pre-hook on the Linear) or while any other global hook exists is not
used: the Linear saves its input. A hook that runs after the Linear took its input (on the block, on the model)
changes nothing. What no hook sees cannot be checked: code in a parent's ``forward`` that writes into the norm's
output through ``.data`` between the norm and the Linear (``.data`` bumps no version counter) defeats the check.

The overlay writes into the frozen base tensor for the duration of one GEMM, holding the parametrization's lock:
a second thread that finds the lock taken (two threads training one model, or evaluating while another trains)
builds the effective weight as a copy from the frozen values instead, after waiting for the overlay to be undone.
Without gradients (``fps eval``, validation) the layer always builds that copy, as the dense path does. Every read
of the base (the parametrization, :meth:`SparseAdd.recompute`) takes the same lock. A double backward
(``create_graph=True``) computes the layer's gradients with differentiable ops instead (a copy of the effective
weight, the delta's gradient gathered from the dense product): the dense path's cost, only then. ``load_state_dict``
into an attached model checks a loaded index (sorted, without repeats, inside the weight) and the sampled
product's pattern is rebuilt from it (it follows the index's version counter).

**These keep the dense path** (the parametrization, with the dense effective weight recomputed rather than saved
inside :func:`recompute_sparse_weights`): convolutions; ``nn.Linear`` subclasses (e.g.
``nn.MultiheadAttention.out_proj``, whose weight its parent reads directly instead of calling it); a Linear whose
instance already has its own ``forward`` (accelerate's hooks, ``device_map`` offload: kept, and left in place by
:func:`detach`); a non-contiguous weight; a masked tensor other than ``weight``; and every layer when
``attach(..., path="dense")`` (kept for benchmarks/train_memory.py's comparison). A tied weight (one tensor used by
several modules) is refused: a parametrization lives on one module, the others would never see the delta; fps
never selects one (:mod:`fps_cli.candidates`), and one listed as fully trainable trains as one tensor everywhere.

Attaching changes the parameter names of the masked modules (``blocks.0.attn.qkv.parametrizations.weight.
original`` instead of ``blocks.0.attn.qkv.weight``) on both paths; :class:`SparseParams` keeps everything keyed by
the original names, and :func:`detach` restores the model exactly (class, forward, values).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules import module as _module_hooks
from torch.nn.utils import parametrize

from . import sampled_product
from .errors import FileFormatError

PATHS = ("sparse", "dense")

# The sampled product's temporaries (per chunk of tokens, or of entries) hold at most this many elements.
_CHUNK_ELEMENTS = 1 << 24


class SparseAdd(nn.Module):
    """Parametrization ``W_base -> W_base + scatter(delta)`` over fixed flat indices.

    Attributes:
        index: sorted flat (row-major) indices of the trainable entries, int64 buffer.
        delta: the change at those entries, a 1-D fp32 parameter.
        sparse_path: whether the owning Linear layer runs :func:`sparse_linear` (set by :func:`attach`).
    """

    def __init__(self, index: Tensor, values: Tensor | None = None) -> None:
        super().__init__()
        index = index.reshape(-1).long()
        self.register_buffer("index", index)
        init = torch.zeros(index.numel(), dtype=torch.float32) if values is None else values.detach().float().clone()
        self.delta = nn.Parameter(init.to(index.device))
        self.sparse_path = False
        self.shape: tuple[int, ...] | None = None
        self.weight_numel: int | None = None  # set by attach(), to check a loaded index
        # Held while the selected entries of the base hold base + delta (the in-place overlay), and while the base is
        # read: another thread that finds it taken builds a copy instead of overlaying twice (effective()).
        self._lock = threading.Lock()
        self.register_load_state_dict_pre_hook(_check_loaded_index)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_lock", None)  # a lock cannot be copied or pickled; each copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def forward(self, base: Tensor) -> Tensor:
        with self._lock:  # never read a base that another thread's overlay holds
            weight = base.reshape(-1).index_add(0, self.index, self.delta.to(base.dtype)).view_as(base)
        _register_effective(weight, self, base)
        return weight

    def recompute(self, base: Tensor) -> Tensor:
        with torch.no_grad(), self._lock:
            return base.reshape(-1).index_add(0, self.index, self.delta.to(base.dtype)).view_as(base)

    def build_pattern(self, shape: torch.Size) -> None:
        """The CSR pattern of the selected entries of a ``[out, in]`` weight, for the sampled product.

        Built at attach time, and again whenever ``index`` has changed in place since (``load_state_dict`` copies
        a loaded index into it): the pattern remembers the index's version counter.
        """
        rows, cols = self.index // shape[1], self.index % shape[1]  # row-major sorted: CSR order is delta order
        # crow[i]: how many entries lie in rows before i (a fixed-size op, so it also runs on fake tensors).
        crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=rows.device))
        # Not persistent: the state_dict keeps today's names (index, delta); .to() still moves them.
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("crow", crow, persistent=False)
        self.shape = tuple(shape)
        self._pattern_version = self.index._version

    def _current_pattern(self) -> None:
        if self.index._version != self._pattern_version:
            self.build_pattern(torch.Size(self.shape))

    @contextlib.contextmanager
    def effective(self, base: Tensor, dtype: torch.dtype | None = None, copy: bool = False) -> Iterator[Tensor]:
        """The effective weight ``base + scatter(delta)`` (cast to ``dtype``), without a copy unless asked.

        In the base's own dtype the selected entries of ``base`` are overwritten in place for the duration of the
        context and restored bit for bit afterwards (also after an exception), holding this parametrization's lock.
        For another ``dtype`` (autocast), with ``copy``, or when another thread holds the lock (two threads on one
        model), a new tensor is built with the effective entries written into it, from the frozen values.
        """
        flat = base.view(-1)
        cast = dtype is not None and dtype != base.dtype
        if not (copy or cast) and self._lock.acquire(blocking=False):
            try:
                with torch.no_grad():
                    # index_select, not flat[index]: advanced indexing took 8 ms here for what index_select does in
                    # 10 us.
                    saved = flat.index_select(0, self.index)  # [selected]
                    flat.index_copy_(0, self.index, saved + self.delta.to(base.dtype))  # the parametrization's sums
                try:
                    yield base
                finally:
                    with torch.no_grad():
                        flat.index_copy_(0, self.index, saved)
            finally:
                self._lock.release()
            return
        # A copy: asked for, a cast (autocast), or another thread's overlay is in the base right now (wait for it
        # to be restored: the copy must be of the frozen values).
        with torch.no_grad():
            with self._lock:
                saved = flat.index_select(0, self.index)
                weight = base.to(dtype or base.dtype, copy=True)
            weight.view(-1).index_copy_(0, self.index, (saved + self.delta.to(base.dtype)).to(weight.dtype))
        yield weight

    def sampled_grad(self, dy: Tensor, x: Tensor, reuse: _SiblingInputs | None = None) -> Tensor:
        """The delta's gradient: for each selected entry ``(i, j)``, ``sum_t dy[t, i] * x[t, j]``, in fp32 or better.

        On the CPU, :mod:`fps_cli.sampled_product`'s kernel reads ``dy`` and ``x`` as they are, in one pass (a chunk
        of tokens at a time when they need a cast to fp32). Otherwise over chunks of tokens, so that the fp32 copies
        (and the transposed copies torch's CPU kernel makes) are bounded, not the size of the layer's input or
        output. The chunk depends on the larger of the two widths only, so that layers reading one input (q, k and
        v) chunk it alike and, with torch's CPU kernel, ``reuse`` (a backward's :class:`_SiblingInputs`) hands each
        the transposed chunks of ``x`` the first one made.

        Args:
            dy: output gradient ``[tokens, out]``.
            x: layer input ``[tokens, in]``.
        """
        self._current_pattern()
        dtype = torch.promote_types(torch.promote_types(dy.dtype, x.dtype), torch.float32)
        step = max(1, _CHUNK_ELEMENTS // (2 * max(dy.shape[1], x.shape[1])))
        if dy.device.type == "cpu" and not (is_fake(dy) or is_fake(x)) and sampled_product.enabled():
            # dy and x read as they are (row-major): no transposed copies. One pass when nothing needs a cast.
            total = torch.zeros(self.index.numel(), dtype=dtype)
            step = max(1, dy.shape[0]) if dy.dtype == x.dtype == dtype else step
            for start in range(0, dy.shape[0], step):
                part_dy, part_x = dy[start : start + step].to(dtype), x[start : start + step].to(dtype)
                sampled_product.accumulate(part_dy, part_x, self.crow, self.cols, total)
            return total
        if reuse is not None and (x.device.type != "cpu" or is_fake(x) or is_fake(dy)):
            reuse = None  # cuSPARSE reads the transposed views without copies; fake tensors run no kernel
        total = None
        for start in range(0, dy.shape[0], step):
            part_dy = dy[start : start + step].to(dtype)
            if reuse is None:
                part = self._sampled_product(part_dy, x[start : start + step].to(dtype))
            else:  # x's chunk as the kernel reads it (its transpose, contiguous): a view, no copy in the kernel
                part = self._sampled_product(part_dy, reuse.transposed(x, start, step, dtype).t())
            total = part if total is None else total.add_(part)
        return total if total is not None else torch.zeros(self.index.numel(), dtype=dtype, device=dy.device)

    def _sampled_product(self, dy: Tensor, x: Tensor) -> Tensor:
        if is_fake(dy) or is_fake(x):
            # Fake tensors (benchmarks/memory_estimate.py) have shapes, no values and no sparse kernels: stand in
            # with what sampled_addmm returns, the values of the selected entries (its workspace is not counted).
            return dy.new_empty(self.index.numel())
        if dy.device.type in ("cpu", "cuda"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
                pattern = torch.sparse_csr_tensor(
                    self.crow, self.cols, dy.new_zeros(self.cols.numel()), self.shape, check_invariants=False
                )
            # dyᵀ as a view: cuSPARSE takes it as a column-major matrix, and torch 2.14's CPU kernel is as fast on
            # it as on a contiguous copy, which cost more than the product itself at LLM shapes (3.1 vs 1.7 ms for
            # a 2048 x 768 layer, 1024 tokens, 3 entries per row; benchmarks/RESULTS.md, issue 19).
            return torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
        return self._gathered_product(dy, x)

    def _gathered_product(self, dy: Tensor, x: Tensor) -> Tensor:
        """The sampled product as gathered columns, in chunks of entries (devices without ``sampled_addmm``)."""
        out = torch.empty(self.index.numel(), dtype=dy.dtype, device=dy.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, dy.shape[0]))
        for start in range(0, out.numel(), step):
            rows, cols = self.rows[start : start + step], self.cols[start : start + step]
            products = dy.index_select(1, rows) * x.index_select(1, cols)  # [tokens, chunk]
            out[start : start + step] = products.sum(0)
        return out


def _check_loaded_index(owner: SparseAdd, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """``load_state_dict`` pre-hook: a loaded index must be sorted, without repeats, and inside the weight.

    The sampled product's CSR pattern is rebuilt from it at the next backward (:meth:`SparseAdd.build_pattern`).
    """
    index = state_dict.get(prefix + "index")
    if index is None or not isinstance(index, Tensor) or index.numel() == 0:
        return
    flat = index.reshape(-1)
    name = prefix.removesuffix(".").replace(".parametrizations.", ".").replace(".original", "") or "index"
    if not bool((flat[1:] > flat[:-1]).all()):
        raise FileFormatError(f"{name}: the loaded index must be sorted and without repeats (a mask's flat indices)")
    if owner.weight_numel is not None and (int(flat[0]) < 0 or int(flat[-1]) >= owner.weight_numel):
        raise FileFormatError(f"{name}: the loaded index reaches past the weight's {owner.weight_numel} entries")


# Whether code other than fps's could have seen a norm's or activation's output between the module that made it and
# the Linear that receives it. A recorded recipe rebuilds the module's own output; a forward hook or a forward
# pre-hook (on that module, on a module in between such as a Dropout(0) or an Identity, on the Linear, or global)
# could replace it or change it in place through ``.data``, which bumps no version counter. So while any model is
# attached, two global hooks of fps's count the calls of modules that carry hooks of their own
# (_FOREIGN_HOOK_CALLS): a recipe is used only if that count did not move between the record and the Linear, the
# producing module carries no hook but fps's recorder, and no other global hook exists.
_FOREIGN_HOOK_CALLS = [0]
_OWN_HOOKS: set[int] = set()  # ids of fps's recorder hooks (module hooks)
_GLOBAL_HOOKS: dict[str, object] = {}  # fps's two global hook handles, while attached models use them
_ATTACHED = weakref.WeakSet()  # the attached models that hold the global hooks


def _count_pre_hooks(module: nn.Module, args: tuple) -> None:
    if module._forward_pre_hooks:
        _FOREIGN_HOOK_CALLS[0] += 1


def _count_forward_hooks(module: nn.Module, args: tuple, output) -> None:
    hooks = module._forward_hooks
    if hooks and not hooks.keys() <= _OWN_HOOKS:
        _FOREIGN_HOOK_CALLS[0] += 1


def _foreign_global_hooks() -> bool:
    own = {h.id for h in _GLOBAL_HOOKS.values()}
    return bool(
        _module_hooks._global_forward_hooks.keys() - own
        or _module_hooks._global_forward_pre_hooks.keys() - own
        or _module_hooks._global_backward_hooks  # full backward hooks wrap modules' inputs and outputs
        or _module_hooks._global_backward_pre_hooks
    )


def _hold_global_hooks(holder: nn.Module) -> None:
    if not _GLOBAL_HOOKS:
        _GLOBAL_HOOKS["pre"] = _module_hooks.register_module_forward_pre_hook(_count_pre_hooks)
        _GLOBAL_HOOKS["post"] = _module_hooks.register_module_forward_hook(_count_forward_hooks)
    _ATTACHED.add(holder)
    weakref.finalize(holder, _release_global_hooks, None)  # never detached: released with the last holder


def _release_global_hooks(holder: nn.Module | None) -> None:
    if holder is not None:
        _ATTACHED.discard(holder)
    if not any(True for _ in _ATTACHED):  # (iteration sees live holders only; len() may count a dying one)
        for handle in _GLOBAL_HOOKS.values():
            handle.remove()
        _GLOBAL_HOOKS.clear()


# ---------------------------------------------- an activation's or a norm's output rebuilt, not saved by a Linear


# Activation modules whose output a sparse Linear may rebuild instead of saving: their forward is one elementwise,
# deterministic op (the same op on the same tensor gives the same bits), and their own backward node keeps their
# *input*, so that keeping it costs nothing. ReLU, Tanh and Sigmoid keep their output instead: nothing to gain.
RECOMPUTED_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Mish)

# Norms whose output a sparse Linear may rebuild: ``F.layer_norm`` of the input (which layer_norm's backward keeps),
# the weight and the bias (parameters). timm's subclass only without its "fast norm" (which runs in low precision
# under autocast).
RECOMPUTED_NORMS = (nn.LayerNorm, TimmLayerNorm, nn.RMSNorm)

# The forwards these classes had when fps was imported: a class whose forward was replaced since is not trusted.
_CLASS_FORWARDS = {kind: kind.forward for kind in RECOMPUTED_ACTIVATIONS + RECOMPUTED_NORMS}


def _layer_norm(shape: tuple[int, ...], eps: float, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    return F.layer_norm(x, shape, weight, bias, eps)


def _rms_norm(shape: tuple[int, ...], eps: float | None, x: Tensor, weight: Tensor | None) -> Tensor:
    return F.rms_norm(x, shape, weight, eps)


# transformers' RMSNorm (LlamaRMSNorm, and its copies in Mistral, Qwen2, Qwen3, ...) and SiLUActivation are told by
# their code: a class whose forward compiles to exactly these functions' code (bytecode, constants and names)
# computes exactly what they compute. Gemma's (1 + weight) norm, or a forward swapped for a hub kernel, does not.
def _hf_rms_norm_forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _hf_silu_forward(self, input):
    return nn.functional.silu(input)


def _hf_rms_norm(eps: float, x: Tensor, weight: Tensor) -> Tensor:
    """transformers' RMSNorm forward, op for op (see :func:`_hf_rms_norm_forward`)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


_SAME_CODE: dict[tuple[type, object], bool] = {}


def _same_code(kind: type, reference) -> bool:
    key = (kind, reference)
    if key not in _SAME_CODE:
        code, ref = getattr(getattr(kind, "forward", None), "__code__", None), reference.__code__
        _SAME_CODE[key] = code is not None and (code.co_code, code.co_consts, code.co_names) == (
            ref.co_code,
            ref.co_consts,
            ref.co_names,
        )
    return _SAME_CODE[key]


def _exact_recipe(module: nn.Module):
    """``input -> (function, tensors)`` with ``function(*tensors)`` the module's output, or None if unsupported.

    See :data:`RECOMPUTED_ACTIVATIONS` and :data:`RECOMPUTED_NORMS`.
    """
    kind = type(module)
    if "forward" in vars(module):
        return None
    if kind not in _CLASS_FORWARDS:
        if isinstance(getattr(module, "weight", None), Tensor) and isinstance(
            getattr(module, "variance_epsilon", None), float
        ):
            if _same_code(kind, _hf_rms_norm_forward):
                # It computes in fp32 from x.to(float32), which its backward keeps: x itself only if already fp32
                # (otherwise keeping x would trade one tensor for another).
                function = functools.partial(_hf_rms_norm, module.variance_epsilon)
                return lambda x: (function, (x, module.weight)) if x.dtype == torch.float32 else None
        elif _same_code(kind, _hf_silu_forward):
            return lambda x: (F.silu, (x,))
        return None
    if kind.forward is not _CLASS_FORWARDS[kind]:  # a patched class (a fused-kernel library): not the known op
        return None
    if kind is nn.RMSNorm:
        # Its backward keeps x in fp32 / fp64, an fp32 copy of a low-precision x (then x is not kept: no recipe).
        function = functools.partial(_rms_norm, tuple(module.normalized_shape), module.eps)
        return lambda x: (function, (x, module.weight)) if x.dtype in (torch.float32, torch.float64) else None
    if kind in RECOMPUTED_NORMS:
        if getattr(module, "_fast_norm", False):
            return None
        function = functools.partial(_layer_norm, tuple(module.normalized_shape), module.eps)
        return lambda x: (function, (x, module.weight, module.bias))
    if getattr(module, "inplace", False):
        return None
    if kind is nn.GELU:
        function = functools.partial(F.gelu, approximate=module.approximate)
    else:
        function = F.silu if kind is nn.SiLU else F.mish
    return lambda x: (function, (x,))


# How many sparse Linear forwards saved a recipe instead of their input (for tests and benchmarks).
_RECIPES_TAKEN = [0]


def _record_recipe(module: nn.Module, args: tuple, output) -> None:
    """Forward hook on a supported module: mark its output with how to rebuild it from tensors autograd keeps."""
    recipe = _exact_recipe(module)
    if recipe is None or len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return
    source = args[0]
    # Only where autograd keeps the input anyway (its backward node saves it) and no cast happened (autocast).
    if not (torch.is_grad_enabled() and source.requires_grad) or output is source:
        return
    if not _GLOBAL_HOOKS or _foreign_global_hooks() or not module._forward_hooks.keys() <= _OWN_HOOKS:
        return  # another hook could change or replace the output before a Linear receives it
    recipe = recipe(source)
    if recipe is None:
        return
    function, tensors = recipe
    if any(t is not None and t.dtype != output.dtype for t in tensors):
        return
    versions = tuple(None if t is None else t._version for t in tensors)
    output._fps_recipe = (function, tensors, output._version, versions, _FOREIGN_HOOK_CALLS[0])
    if len(tensors) == 1:  # an activation: its output may be one operand of a gated product (_product_recipe)
        _ACTIVATION_OUTPUTS[output.untyped_storage()._cdata] = output  # (its StorageImpl: also for fake tensors)


def _input_recipe(x: Tensor):
    """``(function, tensors)`` if ``x`` is, unmodified and unseen by any other hook, the output of a recorded module;
    else None."""
    record = getattr(x, "_fps_recipe", None)
    if record is None:
        return None
    function, tensors, x_version, versions, hook_calls = record
    if hook_calls != _FOREIGN_HOOK_CALLS[0] or _foreign_global_hooks():
        return None  # a hook ran in between (it may have changed x through .data): save x itself
    changed = any(t is not None and t._version != v for t, v in zip(tensors, versions, strict=True))
    if changed or x._version != x_version:
        return None  # something changed in place since the module ran: save x itself
    return function, tensors


# Recorded activation outputs by storage: an autograd node's saved operand is another tensor object on the same
# storage (without fps's mark), so the product's operand is matched to the recorded output through its storage.
_ACTIVATION_OUTPUTS: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def _recorded_activation(operand: Tensor) -> Tensor | None:
    output = _ACTIVATION_OUTPUTS.get(operand.untyped_storage()._cdata)
    if output is None or (output.shape, output.stride(), output.storage_offset(), output.dtype) != (
        operand.shape,
        operand.stride(),
        operand.storage_offset(),
        operand.dtype,
    ):
        return None
    return output


def _gated_product(activation, activation_first: bool, gate: Tensor, other: Tensor) -> Tensor:
    """A gated MLP's product ``act(gate) * other`` (in the forward's operand order: the same bits)."""
    hidden = activation(gate)
    return hidden * other if activation_first else other * hidden


def _product_recipe(x: Tensor):
    """``(function, tensors)`` if ``x`` is, unmodified, a gated MLP's product ``act(gate) * up`` whose ``act(gate)`` is
    a recorded activation output (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``); else None.

    The product is no module's output, so it is found through its autograd node: a ``MulBackward0`` keeps both
    operands, ``up`` and the activation output, and the activation keeps ``gate``: saving ``(gate, up)`` instead of
    the product costs nothing. Only without saved-tensor hooks other than fps's own (checkpointing or offloading
    hooks would run on reading the node's saved operands).
    """
    node = x.grad_fn
    if node is None or type(node).__name__ != "MulBackward0" or x._version != 0:
        return None
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    hooks = top(False)
    if hooks is not None and not getattr(hooks[0], "_fps_pack", False):
        return None
    try:
        left, right = node._saved_self, node._saved_other
    except RuntimeError:  # an operand changed in place since the product: save x itself
        return None
    if not (isinstance(left, Tensor) and isinstance(right, Tensor)):
        return None
    if left.shape != x.shape or right.shape != x.shape or left.dtype != x.dtype or right.dtype != x.dtype:
        return None
    for gated, other, activation_first in ((left, right, True), (right, left, False)):
        recorded = _recorded_activation(gated)
        inner = _input_recipe(recorded) if recorded is not None else None
        if inner is not None and len(inner[1]) == 1:  # an activation's output, not a norm's
            activation, (gate,) = inner
            return functools.partial(_gated_product, activation, activation_first), (gate, other)
    return None


class _SiblingInputs(threading.local):
    """Within one backward, the Linear input last rebuilt from its recipe, and the transposed chunks of the input
    last read (torch's CPU ``sampled_addmm``, the fallback kernel, reads ``x`` transposed and copies it otherwise),
    for the next layer that reads the same input: q, k and v read one, gate and up another, and their backwards run
    one after the other, so one entry of each serves. An entry holds the tensors its key names (no address can be
    reused while it is cached); keys include version counters (an in-place change is a miss); both are emptied when
    the backward ends (``queue_callback``), so nothing outlives the step.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.rebuilt_key, self.rebuilt_keep, self.x = None, (), None
        self.chunks_key, self.chunks_keep, self.chunks = None, (), {}
        self.queued = False

    def _queue_clear(self) -> None:
        if not self.queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.clear)
            self.queued = True

    def rebuilt(self, function, tensors: tuple, meta) -> Tensor:
        """:func:`_recompute`, once per input shared by sibling layers."""
        key = (id(function), tuple(None if t is None else _identity(t) for t in tensors), meta)
        if key != self.rebuilt_key:
            self._queue_clear()
            self.rebuilt_key, self.rebuilt_keep = key, (function, *tensors)
            self.x = _recompute(function, tensors, meta)
        return self.x

    def transposed(self, x: Tensor, start: int, step: int, dtype: torch.dtype) -> Tensor:
        """``x[start : start + step]`` in ``dtype``, transposed and contiguous, once per input and chunk."""
        key = (_identity(x), tuple(x.shape), x.stride(), x.dtype)
        if key != self.chunks_key:
            self._queue_clear()
            self.chunks_key, self.chunks_keep, self.chunks = key, (x,), {}
        chunk = self.chunks.get((start, step, dtype))
        if chunk is None:
            chunk = self.chunks[(start, step, dtype)] = x[start : start + step].to(dtype).t().contiguous()
        return chunk


_SIBLINGS = _SiblingInputs()


def _identity(t: Tensor) -> tuple[int, int, int]:
    """Which memory ``t`` views and how often it was changed: its storage (the ``StorageImpl``, also for fake
    tensors, which have no data pointer), offset and version counter."""
    return t.untyped_storage()._cdata, t.storage_offset(), t._version


def _recompute(function, tensors: tuple, meta, differentiable: bool = False) -> Tensor:
    """The module's output again (the same op on the same tensors in the same dtype, autocast off), then cast to
    the dtype the Linear computed in, as :func:`sparse_linear` cast it (``differentiable``: with its graph, for a
    double backward)."""
    dtype = meta[2]
    grad = contextlib.nullcontext() if differentiable else torch.no_grad()
    with torch.autocast(tensors[0].device.type, enabled=False), grad:
        x = function(*tensors).to(dtype)
    if (x.shape, x.stride(), x.dtype) != meta:
        raise RuntimeError(f"recomputed input differs in layout: {(x.shape, x.stride(), x.dtype)} vs {meta}")
    return x


class _SparseLinear(torch.autograd.Function):
    """``F.linear`` with the effective weight overlaid on the frozen base and the delta's gradient sampled."""

    @staticmethod
    def forward(ctx, x, base, bias, delta, owner, dtype, recipe):
        with owner.effective(base, dtype) as weight:
            y = F.linear(x, weight, bias)
        if y._base is not None:
            # F.linear returns a 3-D input's output as a view of its 2-D GEMM result; a custom Function's output
            # may not be a view, or an in-place op on it (ReLU(inplace=True), out += residual) is refused. Return
            # the GEMM result itself (same bits, no copy) and reshape it outside (sparse_linear).
            y = y._base if y._base.numel() == y.numel() and y._base.is_contiguous() else y.clone()
        # delta is saved so that autograd rejects a backward after the delta changed in place (an optimizer step
        # between forward and backward); base is frozen and restored, so it is kept by reference only.
        if recipe is None:
            ctx.save_for_backward(delta, x)
        else:
            # x is (the autocast cast of) an activation's or a norm's output: keep that module's inputs (its own
            # backward node keeps them anyway, or they are parameters: no memory) and rebuild x in the backward.
            # Saved through autograd, so an in-place change of any of them between forward and backward is
            # rejected (their version counters), as for any saved tensor.
            function, tensors = recipe
            ctx.save_for_backward(delta, *tensors)
            ctx.recompute, ctx.x_meta = function, (x.shape, x.stride(), x.dtype)
            _RECIPES_TAKEN[0] += 1
        ctx.recipe = recipe is not None
        ctx.owner, ctx.base, ctx.dtype, ctx.x_shape = owner, base, dtype, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        delta, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiated
            return _SparseLinear._differentiable_backward(ctx, dy, delta, saved)
        x = None  # only the delta's gradient reads x
        if not ctx.recipe:
            x = saved[0]
        elif ctx.needs_input_grad[3]:
            x = _SIBLINGS.rebuilt(ctx.recompute, tuple(saved), ctx.x_meta)
        owner = ctx.owner
        dy2 = dy.reshape(-1, dy.shape[-1])  # [tokens, out]
        dx = dbias = ddelta = None
        if ctx.needs_input_grad[0]:
            with owner.effective(ctx.base, ctx.dtype) as weight:
                dx = (dy2 @ weight).view(ctx.x_shape)  # [..., in]
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        if ctx.needs_input_grad[3]:
            ddelta = owner.sampled_grad(dy2, x.reshape(-1, x.shape[-1]), _SIBLINGS)
        return dx, None, dbias, ddelta, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, dy, delta, saved):
        """The same gradients as differentiable ops (for a double backward): the effective weight as a copy (the
        in-place overlay would change a tensor the graph keeps), and the delta's gradient gathered from the dense
        product: the dense path's cost, only in this case."""
        owner, base = ctx.owner, ctx.base
        dy2 = dy.reshape(-1, dy.shape[-1])  # [tokens, out]
        dx = dbias = ddelta = None
        if ctx.needs_input_grad[0]:
            with owner._lock:
                weight = base.reshape(-1).index_add(0, owner.index, delta.to(base.dtype)).view_as(base)
            weight = weight.to(ctx.dtype) if ctx.dtype is not None else weight
            dx = (dy2 @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        if ctx.needs_input_grad[3]:
            x = saved[0] if not ctx.recipe else _recompute(ctx.recompute, tuple(saved), ctx.x_meta, True)
            x2 = x.reshape(-1, x.shape[-1])
            dtype = torch.promote_types(torch.promote_types(dy.dtype, x.dtype), torch.float32)
            ddelta = (dy2.to(dtype).t() @ x2.to(dtype)).reshape(-1).index_select(0, owner.index)
        return dx, None, dbias, ddelta, None, None, None


def _is_sparse_forward(module: nn.Module) -> bool:
    """Whether the instance's own ``forward`` is the one :func:`attach` set."""
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func is sparse_linear and forward.args[0] is module


def sparse_linear(module: nn.Linear, x: Tensor) -> Tensor:
    """The forward of a masked ``nn.Linear`` on the sparse path (see the module docstring)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations:
        # Detached while another wrapper (set after attach) still calls this forward: the plain Linear again.
        return nn.Linear.forward(module, x)
    parametrization = parametrizations.weight
    base, owner = parametrization.original, parametrization[0]
    bias = module.bias
    dtype = None
    # Looked up before autocast's cast, which makes a new tensor: the rebuilt input is cast the same way.
    recipe = None
    if torch.is_grad_enabled():
        recipe = _input_recipe(x) or _product_recipe(x)
    if torch.is_autocast_enabled(x.device.type):  # cast as autocast would, then compute without it
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if torch.is_grad_enabled() and (
            x.requires_grad or owner.delta.requires_grad or (bias is not None and bias.requires_grad)
        ):
            y = _SparseLinear.apply(x, base, bias, owner.delta, owner, dtype, recipe)
            shape = (*x.shape[:-1], base.shape[0])
            return y if y.shape == shape else y.view(shape)
        # Without gradients (evaluation, possibly from several threads at once) a copy, as the dense path makes:
        # the in-place overlay is for training steps, where the memory matters.
        with owner.effective(base, dtype, copy=True) as weight:
            return F.linear(x, weight, bias)


def _sparse_path_ok(model: nn.Module, module: nn.Module, attr: str, param: Tensor) -> bool:
    """Whether a masked tensor can take the sparse path (see the module docstring for what keeps the dense one)."""
    if type(module) is not nn.Linear or attr != "weight" or not param.is_contiguous():
        return False
    if "forward" in vars(module):  # the instance's own forward (accelerate's hooks, offload): keep it
        return False
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]
    return len(owners) == 1


@dataclass(eq=False)
class SparseParams:
    """The trainable parameters of a model with deltas attached, keyed by the model's original names.

    Attributes:
        deltas: partially trained parameter name -> its parametrization (``.index``, ``.delta``).
        full: fully trained parameter name -> the parameter itself.
        hooks: handles of the forward hooks :func:`attach` put on activation modules (removed by :func:`detach`).
    """

    deltas: dict[str, SparseAdd]
    full: dict[str, nn.Parameter]
    hooks: list = field(default_factory=list)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every trainable parameter: ``<name>::values`` for a delta, ``<name>`` for a fully trained tensor."""
        for name, p in self.deltas.items():
            yield f"{name}::values", p.delta
        yield from self.full.items()

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    @property
    def numel(self) -> int:
        """Trainable elements (selected entries + fully trained tensors)."""
        return sum(p.numel() for p in self.parameters())


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def attach(
    model: nn.Module,
    indices: Mapping[str, Tensor],
    fully_trainable: list[str],
    values: Mapping[str, Tensor] | None = None,
    path: str = "sparse",
) -> SparseParams:
    """Freeze ``model`` and make only the given entries and tensors trainable.

    Args:
        model: a model whose parameter names are those of the mask (nothing attached yet). Move it to its device
            first: the deltas are created where the base weights are.
        indices: partially trained parameter name -> sorted flat indices of its trainable entries.
        fully_trainable: parameters trained in full (head, biases).
        values: optional starting deltas (``<name>`` -> 1-D values), e.g. from a delta file; default zeros.
        path: ``sparse`` (plain Linear weights compute only the selected entries' gradients) or ``dense`` (every
            layer through the parametrization, the dense gradient gathered: kept for benchmark comparisons).

    Returns:
        The trainable parameters, keyed by the original names.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    params = dict(model.named_parameters())
    unknown = [n for n in [*indices, *fully_trainable] if n not in params]
    if unknown:
        raise KeyError(f"not parameters of the model: {', '.join(unknown)}")
    tied = tied_parameters(model)
    partly_tied = [f"{n} (also {', '.join(tied[n])})" for n in indices if n in tied]
    if partly_tied:
        # A parametrization lives on one module: the others sharing the tensor would never see the delta.
        raise FileFormatError(
            f"the mask trains part of a tied weight, one tensor used under several names: {'; '.join(partly_tied)}. "
            "fps does not select tied weights (they are not candidates); train such a tensor in full or not at all"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    full = {}
    for name in fully_trainable:
        full[name] = params[name]
        full[name].requires_grad_(True)
    deltas = {}
    for name, index in indices.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        start = None if values is None else values[name]
        deltas[name] = SparseAdd(index.to(params[name].device), start)
        deltas[name].weight_numel = params[name].numel()
        fast = path == "sparse" and _sparse_path_ok(model, module, attr, params[name])
        # unsafe: skip the consistency call at registration, which would compute and discard one weight.
        parametrize.register_parametrization(module, attr, deltas[name], unsafe=True)
        if fast:
            deltas[name].build_pattern(params[name].shape)
            deltas[name].sparse_path = True
            module.forward = functools.partial(sparse_linear, module)
    hooks = []
    if any(d.sparse_path for d in deltas.values()):
        # Every supported activation and norm is marked (a cheap attribute on its output); only a sparse Linear fed
        # that very output uses the mark, and only while no other hook could have touched it (_FOREIGN_HOOK_CALLS).
        for module in model.modules():
            if _exact_recipe(module) is not None:
                handle = module.register_forward_hook(_record_recipe, prepend=True)
                _OWN_HOOKS.add(handle.id)
                hooks.append(handle)
    if hooks:
        _hold_global_hooks(model)
    return SparseParams(deltas, full, hooks)


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameters used under several names (tied weights): first name -> the other names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n[0]: n[1:] for n in names.values() if len(n) > 1}


def detach(model: nn.Module, sparse: SparseParams) -> None:
    """Remove the parametrizations: the masked parameters become their frozen base values again."""
    for handle in sparse.hooks:
        handle.remove()
        _OWN_HOOKS.discard(handle.id)
    if sparse.hooks:
        _release_global_hooks(model)
    sparse.hooks.clear()
    for name, owner in sparse.deltas.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        if owner.sparse_path and _is_sparse_forward(module):
            del module.forward  # the class's forward again (a wrapper set after attach stays; see sparse_linear)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


def extract(sparse: SparseParams) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The trained change on the CPU: (indices int64, values fp32, full new values), keyed by parameter name."""
    indices = {n: d.index.detach().cpu().clone() for n, d in sparse.deltas.items()}
    values = {n: d.delta.detach().float().cpu().clone() for n, d in sparse.deltas.items()}
    full = {n: p.detach().cpu().clone() for n, p in sparse.full.items()}
    return indices, values, full


def apply_delta(
    base: Mapping[str, Tensor],
    indices: Mapping[str, Tensor],
    values: Mapping[str, Tensor],
    full: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Merged weights: ``base`` with ``values`` added at ``indices`` and ``full`` tensors replaced (pure).

    The sum is computed exactly as the attached model computes it in the forward pass, so a model loaded with
    the merged weights gives the same outputs as the fine-tuned one.
    """
    merged = dict(base)
    for name, index in indices.items():
        w = base[name]
        merged[name] = w.reshape(-1).index_add(0, index.to(w.device).long(), values[name].to(w)).view_as(w)
    for name, value in full.items():
        merged[name] = value.to(base[name]) if name in base else value
    return merged


# ------------------------------------------------------------------------ recompute instead of saving weights

# Effective weights produced inside recompute_sparse_weights(): storage pointer -> (weak ref, owner, base).
_EFFECTIVE: dict[int, tuple[weakref.ref, SparseAdd, Tensor]] | None = None


def _register_effective(weight: Tensor, owner: SparseAdd, base: Tensor) -> None:
    if _EFFECTIVE is not None and torch.is_grad_enabled() and not is_fake(weight):
        _EFFECTIVE[weight.untyped_storage().data_ptr()] = (weakref.ref(weight), owner, base)


@contextlib.contextmanager
def recompute_sparse_weights() -> Iterator[None]:
    """Run a forward (and the backward it sets up) without saving the dense effective weights.

    A layer saves its weight for the backward pass (to compute the input's gradient). For an attached weight
    that is a dense temporary ``W_base + scatter(delta)``; inside this context it is saved as a recipe
    (which parametrization, and how the saved tensor views the weight) and rebuilt when the backward needs it,
    so the memory of a training step holds no copy of the masked weights. The delta must not change between
    the forward and its backward (true of any training step). The backward may run outside the context.
    """
    global _EFFECTIVE
    previous = _EFFECTIVE
    _EFFECTIVE = {}
    registry = _EFFECTIVE

    def pack(t: Tensor):
        found = None
        if t.device.type != "meta" and not is_fake(t):  # (fake tensors: the memory estimate) have no pointer
            found = registry.get(t.untyped_storage().data_ptr())
        if found is not None:
            ref, owner, base = found
            weight = ref()
            # Alive means its storage cannot have been reused by another tensor: the pointer still names it.
            if weight is not None and weight.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                return (owner, base, t.size(), t.stride(), t.storage_offset())
        return t

    pack._fps_pack = True  # (a gated product's operands may be read under these hooks: _product_recipe)

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        owner, base, size, stride, offset = packed
        return owner.recompute(base).as_strided(size, stride, offset)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _EFFECTIVE = previous
