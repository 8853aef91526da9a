"""The next-token loss without the ``[batch, seq, vocab]`` logits: the output layer applied a chunk of tokens at a time.

A causal LM's logits are the largest tensors of a fine-tuning step: Llama-3.2-3B at length 768 and batch 4 makes
394 M of them, 0.8 GB in bf16, and transformers' loss adds an fp32 copy, the fp32 log-softmax it saves and the
fp32 gradient (about 5 GB with the bf16 ones at the loss's peak), more than a LoRA or fps step keeps for every
decoder layer together. :func:`next_token_sums` never holds more than one chunk of them: it runs the decoder,
keeps the final hidden states of the positions the loss counts (``labels != -100``, shifted), and applies the
output layer to :data:`CHUNK_LOGITS` logits at a time, summing the NLL in fp32 (fp64 over chunks) and, when a
gradient is wanted, computing each chunk's gradient for the hidden states (and the output weight, when it is
trained) right there, as Liger-Kernel's fused linear cross-entropy does: no chunk is recomputed in the backward.

Exact: the same matmul in the same dtype (the autocast dtype the forward ran under, else the hidden states'),
upcast to fp32, log-softmax, NLL, as ``F.cross_entropy(logits.float(), ...)``; the gradient is ``softmax -
onehot`` in fp32, cast to the matmul's dtype for the product with the weight, as autograd casts it (tests compare
both with the full-logits loss).

Only where the model's logits *are* its output layer applied to its decoder's last hidden state: some models
scale or cap them after the output layer (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
Granite's ``logits_scaling``...). :func:`plain_head` checks that once per model on a few real tokens (the model's
own logits against the output layer on the decoder's output) and the task falls back to the full logits where
they differ, or where the model has no ``get_decoder`` / ``get_output_embeddings`` Linear.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 24  # logits per chunk: 16 Mi, 64 MiB in fp32 (Llama-3's 128,256 vocabulary: 130 tokens)

# Models checked by plain_head: model -> its output layer, or None (the logits are not the output layer's).
_CHECKED: weakref.WeakKeyDictionary[nn.Module, nn.Linear | None] = weakref.WeakKeyDictionary()


@dataclass
class HeadInput:
    """What the causal LM's forward returns on the chunked path in place of logits: the decoder's last hidden state
    ``[batch, seq, hidden]``, the output layer, and the dtype its matmul runs in (the forward's autocast dtype, else
    the hidden states' own). ``sums`` caches the batch's ``(nll, tokens, hits)`` once the loss has computed them."""

    hidden: Tensor
    head: nn.Linear
    dtype: torch.dtype
    sums: tuple[Tensor, Tensor, Tensor] | None = None


def assume_plain_head(model: nn.Module) -> None:
    """Record, without the numeric check, that ``model``'s logits are its output layer on its decoder's output
    (for a model on fake or meta tensors, whose values cannot be compared; a LlamaForCausalLM's are)."""
    _CHECKED[model] = _output_layer(model)


def _output_layer(model: nn.Module) -> nn.Linear | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "get_decoder"):
        return None
    try:
        model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return head


def plain_head(model: nn.Module, batch: dict[str, Any]) -> nn.Linear | None:
    """``model``'s output layer when its logits are exactly that layer applied to ``model.get_decoder()``'s last
    hidden state, else ``None``. Checked once per model, in eval mode (no dropout) without gradients, on the first
    row's first 8 real tokens of ``batch``."""
    if model in _CHECKED:
        return _CHECKED[model]
    head = _output_layer(model)
    if head is not None:
        mask = batch["attention_mask"][:1]
        n = min(8, int(mask.sum()))
        start = int(mask[0].nonzero()[0]) if n else 0  # left padding: the first real token
        ids, mask = batch["input_ids"][:1, start : start + n], mask[:, start : start + n]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = _call(model, ids, mask).logits
                ours = head(_call(model.get_decoder(), ids, mask).last_hidden_state)
        except (TypeError, ValueError, AttributeError, NotImplementedError):
            head = None  # a decoder that does not take these inputs or return last_hidden_state: the full logits
        finally:
            model.train(was_training)
        if head is not None and (
            ours.shape != logits.shape
            or not torch.allclose(
                ours.float(), logits.float(), rtol=1e-3, atol=1e-3 * max(1.0, float(logits.abs().max()))
            )
        ):
            head = None
    _CHECKED[model] = head
    return head


def _call(module: nn.Module, ids: Tensor, mask: Tensor) -> Any:
    """``module(input_ids, attention_mask)``, without a KV cache where the forward takes ``use_cache`` (training
    never reads one back)."""
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(module.forward).parameters else {}
    return module(input_ids=ids, attention_mask=mask, **no_cache)


def forward(model: nn.Module, batch: dict[str, Any]) -> HeadInput | Tensor:
    """The decoder's last hidden state with the output layer (:class:`HeadInput`), or, for a model whose logits are
    more than that (:func:`plain_head`), its logits."""
    head = plain_head(model, batch)
    if head is None:
        return _call(model, batch["input_ids"], batch["attention_mask"]).logits
    hidden = _call(model.get_decoder(), batch["input_ids"], batch["attention_mask"]).last_hidden_state
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return HeadInput(hidden, head, dtype)


def next_token_sums(out: HeadInput, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed next-token NLL (fp64; differentiable when a gradient is wanted), the number of tokens it counts, and
    how many of them the top-1 prediction gets right. Position ``t`` predicts label ``t + 1``; ``-100`` is left out.
    """
    if out.sums is not None:
        return out.sums
    hidden, targets, tokens = counted_positions(out.hidden, labels)
    weight, bias = out.head.weight, out.head.bias
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wants_grad:
        nll, hits = _ChunkedNLL.apply(hidden, weight, bias, targets, out.dtype)
    else:
        with torch.no_grad():
            nll, hits, *_ = _chunked(hidden, weight, bias, targets, out.dtype, (False, False, False))
    out.sums = (nll, tokens, hits)
    return out.sums


def counted_positions(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The hidden states of the positions the loss counts ``[tokens, hidden]`` (only they reach the output layer),
    their targets (the next token's label), and how many there are."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep], keep.sum()


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    dtype: torch.dtype,
    grads: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The NLL sum (fp64), the top-1 hits, and, where ``grads`` asks, the gradients of that sum for ``hidden``,
    ``weight`` and ``bias``, a chunk of tokens at a time."""
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    rows = max(1, CHUNK_LOGITS // weight.shape[0])
    nll = torch.zeros((), dtype=torch.float64, device=hidden.device)
    hits = torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_h = torch.empty_like(hidden) if grads[0] else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads[1] else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if grads[2] else None
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows].to(dtype)
        t = targets[start : start + rows]
        logp = torch.log_softmax(F.linear(h, w, b).float(), dim=-1)
        target = logp.gather(1, t[:, None]).squeeze(1)
        nll -= target.sum(dtype=torch.float64)
        hits += (target >= logp.amax(dim=-1)).sum()  # the target's logit is the largest (ties count)
        if not any(grads):
            continue
        g = logp.exp_()  # softmax, in place
        g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
        g = g.to(dtype)
        if grad_h is not None:
            grad_h[start : start + rows] = g @ w
        if grad_w is not None:
            grad_w.addmm_(g.t().float(), h.float())
        if grad_b is not None:
            grad_b += g.float().sum(0)
    return nll, hits, grad_h, grad_w, grad_b


class _ChunkedNLL(torch.autograd.Function):
    """The NLL sum with its gradients computed in the forward, chunk by chunk (:func:`_chunked`); the backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype):
        grads = (
            hidden.requires_grad,
            weight.requires_grad,
            bias is not None and bias.requires_grad,
        )
        nll, hits, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, targets, dtype, grads)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(hits)
        return nll, hits

    @staticmethod
    def backward(ctx, grad_nll, _grad_hits):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_nll.float()
        return (
            (grad_h.float() * scale).to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None,
            (grad_b * scale).to(ctx.weight_dtype) if grad_b is not None else None,
            None,
            None,
        )
