"""The chunked next-token loss (fps_cli.tasks.next_token) against transformers' full-logits loss: same NLL, same
gradients, same hits; the fallback for a model whose logits are more than its output layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fps_cli.tasks import causal_lm as lm
from fps_cli.tasks import next_token
from tests.tiny_llm import tiny_llama_config

VOCAB = 50


def _model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(VOCAB, **overrides)).train()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = lm.IGNORE_INDEX
    labels[0, :4] = lm.IGNORE_INDEX  # a prompt the loss does not count
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, tokens = lm.loss_sums(logits, batch["labels"])
    return nll, tokens, lm.hits(logits, batch)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(next_token, "CHUNK_LOGITS", 4 * VOCAB)  # 4 tokens a chunk: several chunks per batch


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_logits(bias):
    model = _model()
    if bias:  # an untied output layer with a bias: its weight and bias get gradients too
        model.config.tie_word_embeddings = False
        model.lm_head = nn.Linear(32, VOCAB, bias=True)
    batch = _batch()
    nll, tokens, hits = _reference(model, batch)
    (nll.float() / tokens).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    out = lm.forward(model, batch)
    assert isinstance(out, next_token.HeadInput)
    loss = lm.task_loss(out, batch)
    loss.backward()
    assert torch.allclose(loss, nll.float() / tokens, rtol=1e-6, atol=1e-6)
    assert int(lm.count(batch)) == int(tokens) == 3 * 10 - 3 - 3  # shifted: prompt 1-3, padding 8-10
    assert int(lm.hits(out, batch)) == int(hits)
    got = _grads(model)
    assert got.keys() == expected.keys() and model.lm_head.weight.grad is not None  # tied or not
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_chunked_loss_under_bf16_autocast_matches_within_bf16():
    model = _model()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = lm.loss(logits, batch)
    ref.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm.forward(model, batch)
    assert out.dtype == torch.bfloat16  # the output layer's matmul runs in the forward's autocast dtype
    loss = lm.loss(out, batch)
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-3)
    for name, grad in expected.items():
        scale = grad.abs().max()
        assert (_grads(model)[name] - grad).abs().max() <= 2e-2 * scale, name


def test_eval_sums_without_gradients_equal_the_full_logits():
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        nll, tokens, hits = _reference(model, batch)
        sums = lm.eval_sums(lm.forward(model, batch), batch)
    assert torch.allclose(sums["nll"], nll, rtol=1e-6)
    assert int(sums["tokens"]) == int(tokens) and int(sums["correct1"]) == int(hits)


class ScaledLogits(nn.Module):
    """A causal LM whose logits are scaled after the output layer (as Granite's ``logits_scaling`` does)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits / 4.0
        return out


class OddDecoder(ScaledLogits):
    """A causal LM whose get_decoder() is no transformers decoder (it takes no attention_mask)."""

    def get_decoder(self):
        return nn.Identity()

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("wrapper", [ScaledLogits, OddDecoder], ids=["scaled-logits", "decoder-not-callable-alone"])
def test_a_model_the_chunked_loss_cannot_reproduce_falls_back_to_the_full_logits(wrapper):
    """Logits that are more than lm_head on the decoder's output, or a decoder that cannot be called alone: the
    per-model check sends the model down the full-logits path, with the model's own loss."""
    model = wrapper(_model())
    batch = _batch()
    out = lm.forward(model, batch)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 11, VOCAB)
    nll, tokens, _ = _reference(model, batch)
    assert torch.allclose(lm.loss(out, batch), nll.float() / tokens)
    assert next_token.plain_head(_model(), batch) is not None  # the plain Llama passes the check


def test_no_tensor_holds_more_than_one_chunk_of_logits():
    """The point of the chunked loss: a training step (forward, loss, backward) never makes the [batch, seq, vocab]
    logits, only chunks of CHUNK_LOGITS (here 4 tokens x VOCAB)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Widest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                # VOCAB wide, and not the output weight's transpose [hidden, VOCAB]
                if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[-1] == VOCAB and t.shape[-2] != 48:
                    Widest.largest = max(Widest.largest, t.numel())
            return out

    model = _model(hidden_size=48)
    batch = _batch()
    assert next_token.plain_head(model, batch) is not None  # the once-per-model check (8 tokens' logits) first
    with Widest():
        lm.loss(lm.forward(model, batch), batch).backward()
    assert 0 < Widest.largest <= next_token.CHUNK_LOGITS < batch["input_ids"].numel() * VOCAB
