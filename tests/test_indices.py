"""``select_indices``: FPS selection for any model and any batches, language models included."""

from __future__ import annotations

import pytest
import torch
from conftest import CLASS_COLORS, TINY_VIT, tiny_hf_vit, write_images
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.errors import BudgetError, DataError, ModelError
from fps_cli.indices import ForwardError, select_indices

runner = CliRunner()
PAD = 0


def tiny_llama():
    """A randomly initialised Llama: vocabulary 40, hidden 16, two layers of nn.Linear projections."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def padded_batch(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and the ``attention_mask`` a tokenizer would give."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


SEQUENCES = [[5, 9, 3, 17, 8], [11, 2, 30], [7, 7, 21, 4]]
LLM = {"head": [], "train_bias": False}  # nothing but the selected entries is trained


def test_llama_statistics_are_over_real_tokens_only_and_match_a_hand_computation():
    model = tiny_llama()
    sel = select_indices(model, [padded_batch(SEQUENCES)], target_modules=["q_proj", "down_proj"], budget=0.02, **LLM)
    assert set(sel.modules) == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    real = sum(len(s) for s in SEQUENCES)  # 12 real tokens of 15 positions
    assert {s.count for s in sel.stats.values()} == {real}

    # By hand: q_proj of layer 0 sees input_layernorm(embedding) of each real token.
    layer = model.model.layers[0]
    with torch.no_grad():
        tokens = torch.cat([model.model.embed_tokens(torch.tensor(s)) for s in SEQUENCES])  # [12, 16]
        x = layer.input_layernorm(tokens).double()
    a = sel.statistic("model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(a, x.abs().mean(0), rtol=1e-6, atol=1e-7)
    sel_l2 = select_indices(model, [padded_batch(SEQUENCES)], target_modules=["q_proj"], budget=0.02, norm="l2", **LLM)
    torch.testing.assert_close(sel_l2.statistic("model.layers.0.self_attn.q_proj"), x.square().mean(0).sqrt())
    w = layer.self_attn.q_proj.weight.detach().abs()
    torch.testing.assert_close(sel.scores("model.layers.0.self_attn.q_proj"), (w * a.float()).float())

    # Padding changes nothing: each sequence alone, unpadded, in its own batch gives the same statistics.
    alone = select_indices(
        model,
        [
            {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
            for s in SEQUENCES
        ],
        target_modules=["q_proj", "down_proj"],
        budget=0.02,
        **LLM,
    )
    for name in sel.stats:
        torch.testing.assert_close(sel.stats[name].abs_sum, alone.stats[name].abs_sum, rtol=1e-5, atol=1e-6)
    assert {n: i.tolist() for n, i in sel.indices.items()} == {n: i.tolist() for n, i in alone.indices.items()}


def test_llama_selection_follows_fps_budget_and_neuron_rule():
    model = tiny_llama()
    batch = padded_batch(SEQUENCES)
    sel = select_indices(model, [batch], target_modules=r".*self_attn\.(q|v)_proj", budget=0.03, **LLM)
    total = sum(p.numel() for p in model.parameters())
    assert sel.total_params == total and sel.fully_trainable == []
    assert sel.selected == round(0.03 * total) == sum(i.numel() for i in sel.indices.values())
    k = sel.selected // sum(m.out_features for m in sel.modules.values())
    for name, idx in sel.indices.items():
        assert torch.equal(idx, idx.sort().values) and idx.dtype == torch.int64
        cols = sel.modules[name].in_features
        per_row = torch.bincount(idx // cols, minlength=sel.modules[name].out_features)
        assert set(per_row.tolist()) <= {k, k + 1}
    # topk_per_neuron: every row its own top-2 by |W| * a, ties to the lower column.
    top2 = select_indices(model, [batch], target_modules=["v_proj"], topk_per_neuron=2, **LLM)
    for name, idx in top2.indices.items():
        scores = top2.scores(name)
        expected = scores.topk(2, dim=1).indices.sort(dim=1).values
        got = (idx % scores.shape[1]).reshape(-1, 2)
        assert torch.equal(got, expected)


def test_budget_counts_the_head_as_fps_does():
    model = tiny_llama()
    with pytest.raises(BudgetError, match="leaves no room"):
        select_indices(model, [padded_batch(SEQUENCES)], target_modules=["q_proj"], budget=0.01)  # lm_head is 640


def test_gpt2_conv1d_is_refused_with_the_reason():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    batch = padded_batch(SEQUENCES)
    with pytest.raises(ModelError, match=r"matches no Linear.*h\.0\.attn\.c_attn \(Conv1D\).*not an nn\.Linear"):
        select_indices(model, [batch], target_modules=["c_attn"], **LLM)
    with pytest.raises(ModelError, match="GPT2LMHeadModel has no Linear, Conv1d, Conv2d layer outside its head"):
        select_indices(model, [batch], **LLM)


def test_bad_inputs_give_clear_errors():
    model = tiny_llama()
    batch = padded_batch(SEQUENCES)
    with pytest.raises(DataError, match="batches is empty"):
        select_indices(model, [], target_modules=["q_proj"], **LLM)
    with pytest.raises(ForwardError, match="no targeted layer saw any input; it must call the model"):
        select_indices(model, [batch], lambda m, b: None, target_modules=["q_proj"], **LLM)
    with pytest.raises(ForwardError, match="forward_fn failed on batch 0: TypeError"):
        select_indices(model, [batch], lambda m, b: m(b), target_modules=["q_proj"], **LLM)
    with pytest.raises(ForwardError, match="forward_fn must be callable"):
        select_indices(model, [batch], "model(**batch)", target_modules=["q_proj"], **LLM)
    with pytest.raises(ModelError, match=r"target_modules \['query'\] matches no Linear, Conv1d, Conv2d layer"):
        select_indices(model, [batch], target_modules=["query"], **LLM)
    with pytest.raises(ModelError, match=r"it matches model\.embed_tokens \(Embedding\)"):
        select_indices(model, [batch], target_modules="model.embed_tokens", **LLM)
    # No hook is left behind after a failure, and the model is back in its mode.
    model.train()
    with pytest.raises(ForwardError):
        select_indices(model, [batch], lambda m, b: 1 / 0, target_modules=["q_proj"], **LLM)
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_timm_model_gives_the_same_selection_as_fps_select(tmp_path):
    """The same images through the library call and through ``fps select`` give the same mask."""
    import numpy as np
    from PIL import Image

    from fps_cli.data import discover, eval_transform
    from fps_cli.models import ModelSpec, create_model
    from fps_cli.selector import seed_everything

    data = tmp_path / "data"
    for c in range(3):
        write_images(data / f"class_{c}", 3, CLASS_COLORS[c], seed=c)
    mask_path = tmp_path / "mask.safetensors"
    args = ["select", *TINY_VIT, "--data", data, "--budget", "0.05", "-o", mask_path, "--no-scores", "-q"]
    out = runner.invoke(app, [str(a) for a in [*args, "--num-workers", "0"]])
    assert out.exit_code == 0, out.output

    from fps_cli.formats import read_mask

    seed_everything(0)
    model = create_model(ModelSpec("test_vit", pretrained=False, num_classes=3, img_size=32))
    transform = eval_transform(model, 32)
    samples = discover(data).train.samples
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in samples])
    assert np.isfinite(images.numpy()).all()
    sel = select_indices(model, [(images, torch.zeros(len(images)))], budget=0.05)
    mask = read_mask(mask_path)
    assert {f"{n}.weight": i.tolist() for n, i in sel.indices.items()} == {
        n: i.tolist() for n, i in mask.indices.items()
    }
    assert sel.fully_trainable == mask.fully_trainable
    assert "patch_embed.proj" in sel.indices  # convolutions are fps candidates too


def test_hf_vision_model_with_pixel_values_mapping():
    pytest.importorskip("transformers")
    model = tiny_hf_vit().eval()
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])} for _ in range(2)]
    sel = select_indices(model, batches, target_modules=["q_proj", "v_proj", "fc2"], budget=0.2)
    assert sel.batches == 2
    tokens = 2 * 2 * (16 + 1)  # images x (patches + cls)
    assert {s.count for s in sel.stats.values()} == {tokens}
    assert sel.fully_trainable[-2:] == ["classifier.weight", "classifier.bias"]
    # Only the targeted layers' biases count as fully trained; the others are frozen with their layers.
    assert "vit.layers.0.attention.k_proj.bias" not in sel.fully_trainable
    assert "vit.layers.0.attention.q_proj.bias" in sel.fully_trainable
    assert sum(i.numel() for i in sel.indices.values()) == sel.selected


def test_bert_classifier_pooler_counts_one_vector_per_sequence():
    """A BERT classifier's pooler sees one [CLS] vector per sequence ([batch, dim]): never padding, counted whole
    (it used to raise ForwardError whenever the batches carried an attention_mask)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:2, 4:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    selection = select_indices(model, batches, budget=0.05)
    pooler = "bert.pooler.dense"
    assert pooler in selection.indices
    stats = selection.stats[pooler]
    assert int(stats.count) == 4  # one vector per sequence, padding or not
