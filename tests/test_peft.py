"""FPS inside Hugging Face PEFT: a SHiRA ``mask_fn`` from FPS, and ``fps export --to peft`` through the real package."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COLORS, REPO, TINY_VIT, tiny_hf_vit, write_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fps_cli.cli import app

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAIN = ["--epochs", "1", "--lr", "0.01", "--warmup-epochs", "0", *FAST, "-q"]


def fps(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def make_data(root: Path) -> Path:
    for c in range(3):
        write_images(root / "data" / "train" / f"class_{c}", 4, CLASS_COLORS[c], seed=c)
    return root / "data"


def select_and_train(root: Path, model: list[str]) -> Path:
    """``fps select`` then ``fps train`` through the CLI; returns the delta file."""
    data = make_data(root)
    mask, delta = root / "mask.safetensors", root / "delta.safetensors"
    out = fps("select", *model, "--data", data, "--budget", "0.05", "-o", mask, "--no-scores", *FAST, "-q")
    assert out.exit_code == 0, out.output
    out = fps("train", "--mask", mask, "-o", delta, *TRAIN)
    assert out.exit_code == 0, out.output
    return delta


@pytest.fixture(scope="module")
def timm_delta(tmp_path_factory) -> Path:
    return select_and_train(tmp_path_factory.mktemp("timm"), TINY_VIT)


@pytest.fixture(scope="module")
def hf_delta(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tiny_hf_vit(root / "tiny-vit")
    return select_and_train(root, ["--model", f"hf:{root / 'tiny-vit'}"])


@pytest.fixture
def workdir(timm_delta, tmp_path, monkeypatch) -> Path:
    """A fresh cwd holding a copy of the timm delta as ./delta.safetensors."""
    (tmp_path / "delta.safetensors").write_bytes(timm_delta.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def logits(model, pixels: torch.Tensor) -> torch.Tensor:
    from fps_cli.models import output_logits

    with torch.no_grad():
        return output_logits(model(pixels))


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("which", ["timm_delta", "hf_delta"])
def test_adapter_gives_the_fine_tuned_logits_and_merges_to_fps_merge(which, request, tmp_path):
    import fps_cli
    from fps_cli.formats import read_delta
    from fps_cli.peft_adapter import load_base

    delta = request.getfixturevalue(which)
    adapter = tmp_path / "adapter"
    out = fps("export", "--to", "peft", "--delta", delta, "-o", adapter, "--json", "-q")
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert sorted(p.name for p in adapter.iterdir()) == [CONFIG, WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left

    # The folder is the one PEFT's SHiRA writes: indices [2, r * (in + out)], the delta's values, zero padding.
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == summary["r"] and config["mask_type"] == "fps"
    d = read_delta(delta)
    tensors = load_file(adapter / "adapter_model.safetensors")
    base = load_base(delta)
    layers = dict(base.named_modules())
    assert summary["entries"] == sum(d.indices[f"{t}.weight"].numel() for t in config["target_modules"])
    padding = 0
    for target in config["target_modules"]:
        layer = layers[target]
        idx = tensors[f"base_model.model.{target}.shira_indices"]
        val = tensors[f"base_model.model.{target}.shira_weight"]
        assert idx.dtype == torch.int32 and idx.shape == (2, config["r"] * (layer.in_features + layer.out_features))
        flat = idx[0].long() * layer.in_features + idx[1].long()
        kept = torch.isin(flat, d.indices[f"{target}.weight"])
        assert torch.equal(flat[kept], d.indices[f"{target}.weight"])
        assert torch.equal(val[kept], d.values[f"{target}.weight"])
        assert not val[~kept].any()
        padding += int((~kept).sum())
    assert padding == summary["padded"]
    assert set(config["modules_to_save"]) == set(summary["modules_to_save"])

    # Loaded by the real PEFT package onto the delta's base: the fine-tuned model's logits, bit for bit.
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tuned = fps_cli.load_merged(delta)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert torch.equal(logits(model, pixels), logits(tuned, pixels))

    # merge_and_unload() gives the weights fps merge writes.
    merged_file = tmp_path / "merged.safetensors"
    assert fps("merge", "--delta", delta, "-o", merged_file, "-q").exit_code == 0
    expected = load_file(merged_file)
    state = model.merge_and_unload().state_dict()
    assert set(state) == set(expected)
    assert [k for k in expected if not torch.equal(state[k], expected[k])] == []


def test_library_call_and_file_sizes(workdir):
    from fps_cli.peft_adapter import export_peft

    result = export_peft("delta.safetensors", workdir / "adapter")
    assert result.delta_bytes == (workdir / "delta.safetensors").stat().st_size
    assert result.bytes == (workdir / "adapter" / "adapter_model.safetensors").stat().st_size
    # test_vit's patch embedding is a Conv2d, which SHiRA cannot wrap: it travels whole, as does the head.
    assert result.modules_to_save == {"patch_embed.proj": "Conv2d", "head": "fully trained"}
    with safe_open(workdir / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["fps.exported_from"])["model"] == "test_vit"


def test_existing_folder_is_refused_without_force(workdir):
    (workdir / "adapter").mkdir()
    (workdir / "adapter" / "keep.txt").write_text("mine")
    out = fps("export", "--to", "peft", "-o", "adapter")
    assert out.exit_code == 1
    assert out.stderr == (
        "error: adapter is not empty (it holds keep.txt); pass --force to write into it (only "
        f"{CONFIG}, {WEIGHTS} are replaced; other files stay)\n"
    )
    assert [p.name for p in (workdir / "adapter").iterdir()] == ["keep.txt"]

    # --force writes the adapter's two files into the folder; a file fps did not write stays, bit for bit.
    out = fps("export", "--to", "peft", "-o", "adapter", "--force", "-q")
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (workdir / "adapter").iterdir()) == [CONFIG, WEIGHTS, "keep.txt"]
    assert (workdir / "adapter" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in workdir.iterdir()) == ["adapter", "delta.safetensors"]

    out = fps("export", "--to", "peft", "-o", "adapter")
    assert out.exit_code == 1
    assert out.stderr == f"error: adapter already holds {CONFIG} and {WEIGHTS}; pass --force to replace them\n"

    out = fps("export", "--to", "peft", "-o", "delta.safetensors", "--force")
    assert out.exit_code == 1
    assert out.stderr == "error: cannot write the folder delta.safetensors/: delta.safetensors is a file\n"


def test_wrong_base_is_refused_as_merge_refuses_it(workdir):
    import timm

    torch.manual_seed(123)
    save_file(timm.create_model("test_vit", img_size=32, num_classes=3).state_dict(), "other.safetensors")
    merged = fps("merge", "--checkpoint", "other.safetensors", "-q")
    exported = fps("export", "--to", "peft", "--checkpoint", "other.safetensors", "-o", "adapter", "-q")
    assert exported.exit_code == merged.exit_code == 1
    assert exported.stderr == merged.stderr
    assert "was trained on other base weights than test_vit as loaded now" in exported.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["delta.safetensors", "other.safetensors"]


def test_delta_without_sparse_linear_weights_is_refused(workdir):
    from fps_cli.formats import read_delta, save_delta

    d = read_delta("delta.safetensors")
    conv = "patch_embed.proj.weight"
    d.indices, d.values = {conv: d.indices[conv]}, {conv: d.values[conv]}
    d.provenance.pop("touched_sha256")  # the checksum of the tensors it changes covered the Linear weights too
    save_delta("conv.safetensors", d)
    out = fps("export", "--to", "peft", "--delta", "conv.safetensors", "-o", "adapter", "-q")
    assert out.exit_code == 1
    assert out.stderr.startswith(
        "error: the delta trains no nn.Linear weight partially, so a SHiRA adapter would hold nothing sparse "
        "(changed modules: patch_embed.proj, "
    )
    assert not (workdir / "adapter").exists()


def test_without_peft_the_message_names_the_extra(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    out = fps("export", "--to", "peft", "-o", "adapter")
    assert out.exit_code == 1
    assert out.stderr == ("error: this needs Hugging Face PEFT, which is not installed; pip install 'fps-cli[peft]'\n")
    assert not (workdir / "adapter").exists()


def test_to_other_formats_is_a_usage_error(workdir):
    out = fps("export", "--to", "onnx", "-o", "adapter")
    assert out.exit_code == 2
    assert "'onnx' is not 'peft'" in out.output or "'onnx' is not one of 'peft'" in out.output


# ------------------------------------------------------------------------------------------ mask_fn


def test_shira_mask_fn_trains_exactly_the_fps_selection():
    from test_indices import LLM, SEQUENCES, padded_batch, tiny_llama

    from fps_cli.indices import select_indices
    from fps_cli.peft_adapter import shira_mask_fn

    model = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    sel = select_indices(model, [padded_batch(SEQUENCES)], target_modules=targets, budget=0.05, **LLM)
    r = sel.shira_r
    width = sum(m.in_features + m.out_features for m in sel.modules.values())
    assert r * width <= sel.selected < (r + 1) * width  # the budget's entries, spent as SHiRA spends them
    expected = sel.shira_indices(r)

    config = peft.ShiraConfig(r=r, mask_type="fps", target_modules=targets)
    config.mask_fn = shira_mask_fn(sel)
    peft_model = peft.get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(sel.modules) and all(n.endswith("shira_weight.default") for n in trainable)
    for name, layer in sel.modules.items():
        wrapped = peft_model.base_model.model.get_submodule(name)
        idx = wrapped.shira_indices["default"].long()
        flat = (idx[0] * layer.in_features + idx[1]).sort().values
        assert torch.equal(flat, expected[name]), name
        # fps's neuron rule within the layer: every row its top K or K + 1 by |W| * a, ties to the lower column.
        scores = sel.scores(name)
        rows, cols = scores.shape
        count = r * (rows + cols)
        per_row = torch.bincount(flat // cols, minlength=rows)
        assert set(per_row.tolist()) <= {count // rows, count // rows + 1} and int(per_row.sum()) == count
        for row in range(rows):
            k = int(per_row[row])
            order = sorted(range(cols), key=lambda c: (-float(scores[row, c]), c))[:k]
            assert sorted(order) == (flat[flat // cols == row] % cols).tolist()


def test_shira_mask_fn_refuses_a_layer_it_did_not_select():
    from test_indices import LLM, SEQUENCES, padded_batch, tiny_llama

    from fps_cli.errors import FpsError
    from fps_cli.indices import select_indices
    from fps_cli.peft_adapter import shira_mask_fn

    model = tiny_llama()
    sel = select_indices(model, [padded_batch(SEQUENCES)], target_modules=["q_proj"], budget=0.02, **LLM)
    config = peft.ShiraConfig(r=1, mask_type="fps", target_modules=["q_proj", "k_proj"])
    config.mask_fn = shira_mask_fn(sel)
    with pytest.raises(FpsError, match="SHiRA targets a Linear that select_indices did not target"):
        peft.get_peft_model(model, config)


# ------------------------------------------------------------------------------------------- README


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Use with PEFT")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "far", "away"]
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)


def test_readme_use_with_peft_runs(timm_delta, tmp_path, monkeypatch):
    from test_indices import tiny_llama

    section = readme_section()
    python = code_blocks(section, "python")
    assert len(python) == 2, "the section holds a selection-and-training block and a loading block"

    # Block 1, as a PEFT user pastes it, with the model name swapped for a tiny local Llama.
    llm = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(llm)
    tiny_tokenizer(llm)
    first = re.sub(r'^MODEL = ".*"', f'MODEL = "{llm}"', python[0], count=1, flags=re.M)
    assert first != python[0]
    scope: dict = {}
    exec(compile(first, "README.md (Use with PEFT, block 1)", "exec"), scope)
    assert scope["peft_model"].peft_config["default"].peft_type == "SHIRA"

    # The shell block's export line, then block 2, in a folder holding an fps run's delta.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "delta.safetensors").write_bytes(timm_delta.read_bytes())
    exports = [line for block in code_blocks(section, "bash") for line in block.splitlines()]
    exports = [line.split("#")[0].split() for line in exports if line.startswith("fps export")]
    assert exports, "the section shows fps export"
    for line in exports:
        out = fps(*line[1:], "-q")
        assert out.exit_code == 0, out.output
    scope = {}
    exec(compile(python[1], "README.md (Use with PEFT, block 2)", "exec"), scope)
    assert isinstance(scope["model"], peft.PeftModel)


# ----------------------------------------------------------------------------- issue 17: loaders, padding, copies


def test_hf_adapter_loads_through_auto_peft_model(hf_delta, tmp_path):
    """``AutoPeftModel.from_pretrained(DIR)`` alone rebuilds base and adapter: the config names the base as
    transformers does (no hf: prefix) and carries the auto_mapping PEFT writes for a model without a task type."""
    import fps_cli

    adapter = tmp_path / "adapter"
    assert fps("export", "--delta", hf_delta, "-o", adapter, "-q").exit_code == 0
    config = json.loads((adapter / CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(hf_delta.parent / "tiny-vit")
    assert config["auto_mapping"] == {
        "base_model_class": "ViTForImageClassification",
        "parent_library": "transformers.models.vit.modeling_vit",
    }
    model = peft.AutoPeftModel.from_pretrained(str(adapter)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(model, pixels), logits(fps_cli.load_merged(hf_delta), pixels))


def test_timm_adapter_names_a_base_timm_resolves(timm_delta, tmp_path):
    import timm

    adapter = tmp_path / "adapter"
    assert fps("export", "--delta", timm_delta, "-o", adapter, "-q").exit_code == 0
    config = json.loads((adapter / CONFIG).read_text())
    assert config["base_model_name_or_path"] == "test_vit" and config.get("auto_mapping") is None
    assert timm.is_model(config["base_model_name_or_path"])


def test_tuple_batches_with_a_hidden_mask_are_refused():
    from test_indices import LLM, SEQUENCES, padded_batch, tiny_llama

    from fps_cli.errors import DataError
    from fps_cli.indices import select_indices

    model = tiny_llama()
    batch = padded_batch(SEQUENCES)
    pair = (batch["input_ids"], batch["attention_mask"])

    def forward(model, batch):
        return model(input_ids=batch[0], attention_mask=batch[1])

    with pytest.raises(DataError, match=r"batch 0 is a tuple whose item 1 looks like an attention_mask"):
        select_indices(model, [pair], forward, target_modules=["q_proj"], budget=0.02, **LLM)
    counted = select_indices(model, [pair], forward, target_modules=["q_proj"], budget=0.02, count_padding=True, **LLM)
    assert {s.count for s in counted.stats.values()} == {15}  # every position, padding included, as asked
    real = select_indices(model, [batch], target_modules=["q_proj"], budget=0.02, **LLM)
    assert {s.count for s in real.stats.values()} == {12}  # the mapping form: real tokens only
    full = (batch["input_ids"][:, :3], batch["attention_mask"][:, :3])  # no padding in it: nothing to refuse
    select_indices(model, [full], forward, target_modules=["q_proj"], budget=0.02, **LLM)


def test_shira_on_a_copy_of_the_selected_model_says_layers_match_by_identity():
    import copy

    from test_indices import LLM, SEQUENCES, padded_batch, tiny_llama

    from fps_cli.errors import FpsError
    from fps_cli.indices import select_indices
    from fps_cli.peft_adapter import shira_mask_fn

    model = tiny_llama()
    sel = select_indices(model, [padded_batch(SEQUENCES)], target_modules=["q_proj"], budget=0.02, **LLM)
    config = peft.ShiraConfig(r=1, mask_type="fps", target_modules=["q_proj"])
    config.mask_fn = shira_mask_fn(sel)
    with pytest.raises(FpsError, match=r"matches layers by identity, not by name: this Linear is a copy of model\."):
        peft.get_peft_model(copy.deepcopy(model), config)
