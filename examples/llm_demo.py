"""A causal language model that learns, offline: pretrain a tiny Llama on one text, fine-tune it on another with fps.

    python examples/llm_demo.py --threads 1             # about one CPU-minute (57 s user time, measured)
    python examples/llm_demo.py --pretrain-steps 100 --finetune-steps 40     # a quicker look

What it printed (one seed; 1 min 51 s wall on a 2-core machine shared with two other jobs):

    pretrained a 0.87 M-parameter Llama on 1177 rows of Python docstrings in 48 s (perplexity there 114.1)
    fine-tuning on 1473 rows, perplexity on 147 held-out rows: 241.5 before
      lora    7,168 trainable  lr 0.03  perplexity   145.7  (14 s)
      fps     7,168 trainable  lr 0.03  perplexity   134.9  (19 s)
      norm    1,152 trainable  lr 0.03  perplexity   166.6  (11 s)

1. **Pretraining.** A byte-level BPE tokenizer (``tokenizers``) and a tiny randomly initialised ``LlamaForCausalLM``
   (4 layers, hidden 128, ~1 M parameters) learn the docstrings of Python's own standard library (read with ``ast``
   from its source files, nothing imported): always there, wherever Python is.
2. **Fine-tuning** on another body of text: the glosses of WordNet's nouns (``/usr/share/wordnet/data.noun``, Debian's
   ``wordnet-base``), or any text file given with ``--finetune-text``, 90% to train, 10% held out. Three ways, each
   training about the same number of weights:

   - ``fps``: :func:`fps_cli.select_indices` (one gradient-free pass: ``|W| * mean |x|`` per weight, top entries of
     every output neuron of the decoder's Linear layers) and :func:`fps_cli.sparse.attach` (only those entries train);
   - ``lora``: PEFT LoRA on q_proj / v_proj (PEFT's default for Llama), its ``r`` setting the count fps matches;
   - ``norm``: only the RMSNorm weights (every one of them: fewer than the others).

   Perplexity (``exp`` of the mean next-token NLL, :mod:`fps_cli.tasks.causal_lm`) on the held-out text is printed
   before and after each.

The same recipe runs in seconds on made-up text in ``tests/test_llm_demo.py``.
"""

from __future__ import annotations

import argparse
import ast
import math
import random
import sysconfig
import time
from pathlib import Path

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")


def python_docstrings(limit: int = 3000) -> list[str]:
    """Docstrings (first paragraph, one line each) of the standard library's top-level modules, their classes and
    functions, read from the source with ``ast``."""
    texts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc:
                first = " ".join(doc.strip().split("\n\n")[0].split())
                if len(first) > 20:
                    texts.append(first)
        if len(texts) >= limit:
            break
    return texts[:limit]


def wordnet_glosses(path: Path = WORDNET_NOUNS, limit: int = 3000) -> list[str]:
    """The glosses (definitions and examples) of WordNet's nouns."""
    texts = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            texts.append(line.split("|", 1)[1].strip())
            if len(texts) >= limit:
                break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, with ``<s>`` / ``</s>`` / ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def rows_of(tokenizer, texts: list[str], seq_len: int) -> list:
    """``texts`` as packed rows of ``seq_len`` tokens (:func:`fps_cli.tasks.causal_lm.pack`), all learned."""
    from fps_cli.tasks import causal_lm as lm

    records = [lm.Record("text", {"text": t}, f"text {i}") for i, t in enumerate(texts)]
    items, _ = lm.tokenize_all(tokenizer, records, max_length=10**9)
    return lm.pack(items, seq_len)


def batches(rows: list, batch_size: int, pad_id: int, seed: int | None = None):
    from fps_cli.tasks import causal_lm as lm

    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield lm.collate([rows[i] for i in order[start : start + batch_size]], pad_id)


def perplexity(model, rows: list, pad_id: int, batch_size: int = 32) -> float:
    """``exp`` of the mean next-token NLL over every counted token of ``rows``."""
    import torch

    from fps_cli.tasks import causal_lm as lm

    nll, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches(rows, batch_size, pad_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total, count = lm.loss_sums(logits, batch["labels"])
            nll, tokens = nll + float(total), tokens + int(count)
    model.train(was_training)
    return lm.summarize({"nll": nll, "tokens": tokens})["perplexity"]


def tiny_llama(vocab_size: int, pad_id: int, seed: int = 0, hidden: int = 128, layers: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model, params, rows: list, pad_id: int, *, steps: int, lr: float, batch_size: int, seed: int, context=None):
    """AdamW (no weight decay) with a linear warm-up and cosine decay over ``steps`` steps of shuffled batches."""
    import contextlib

    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    step, epoch = 0, 0
    while step < steps:
        for batch in batches(rows, batch_size, pad_id, seed=seed + epoch):
            with context() if context is not None else contextlib.nullcontext():
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
        epoch += 1


def finetune(method: str, pretrained: dict, make_model, train_rows, eval_rows, pad_id: int, args) -> dict:
    """Fine-tune a fresh copy of the pretrained model with ``method``; its trainable count and held-out perplexity."""
    import torch

    from fps_cli import select_indices
    from fps_cli.sparse import attach, recompute_sparse_weights
    from fps_cli.tasks.causal_lm import statistics_forward

    model = make_model()
    model.load_state_dict(pretrained)
    context = None
    if method == "lora":
        import peft

        config = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = args.lora_lr
    elif method == "norm":
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = args.norm_lr
    else:
        total = sum(p.numel() for p in model.parameters())
        selection = select_indices(
            model,
            batches(train_rows, args.batch_size, pad_id),
            statistics_forward,
            target_modules=r".*layers\.\d+\.(self_attn|mlp)\.\w+",
            budget=args.count / total,
            head=[],
            train_bias=False,
        )
        indices = {f"{name}.weight": idx for name, idx in selection.indices.items()}
        sparse = attach(model, indices, [])
        params = sparse.parameters()
        context = recompute_sparse_weights
        lr = args.fps_lr
    trainable = sum(p.numel() for p in params)
    started = time.perf_counter()
    train(model, params, train_rows, pad_id, steps=args.finetune_steps, lr=lr, batch_size=args.batch_size,
          seed=args.seed, context=context)  # fmt: skip
    seconds = time.perf_counter() - started
    with torch.no_grad():
        after = perplexity(model, eval_rows, pad_id)
    return {"trainable": trainable, "perplexity": after, "seconds": seconds, "lr": lr}


def run(pretrain_texts: list[str], finetune_texts: list[str], args: argparse.Namespace) -> dict:
    """The whole demo on two bodies of text; returns every figure."""
    import torch

    torch.manual_seed(args.seed)
    tokenizer = train_tokenizer(pretrain_texts, args.vocab_size)
    pad_id = tokenizer.pad_token_id
    pre_rows = rows_of(tokenizer, pretrain_texts, args.seq_len)
    split = int(len(finetune_texts) * 0.9)
    train_rows = rows_of(tokenizer, finetune_texts[:split], args.seq_len)
    eval_rows = rows_of(tokenizer, finetune_texts[split:], args.seq_len)

    def make_model():
        return tiny_llama(len(tokenizer), pad_id, args.seed, args.hidden, args.layers)

    model = make_model()
    started = time.perf_counter()
    train(model, list(model.parameters()), pre_rows, pad_id, steps=args.pretrain_steps, lr=args.pretrain_lr,
          batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    pretrain_seconds = time.perf_counter() - started
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    report = {
        "params": sum(p.numel() for p in model.parameters()),
        "pretrain_rows": len(pre_rows),
        "finetune_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "pretrain_seconds": pretrain_seconds,
        "pretrained_perplexity_on_pretrain_text": perplexity(model, pre_rows[:64], pad_id),
        "before": perplexity(model, eval_rows, pad_id),
        "methods": {},
    }
    lora_count = None
    for method in ("lora", "fps", "norm"):
        if method == "fps":
            args.count = lora_count  # fps trains as many weights as LoRA
        result = finetune(method, pretrained, make_model, train_rows, eval_rows, pad_id, args)
        if method == "lora":
            lora_count = result["trainable"]
        report["methods"][method] = result
    return report


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-text", type=Path, default=None, help="one text per line (default: WordNet's glosses)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--fps-lr", type=float, default=3e-2)
    p.add_argument("--lora-lr", type=float, default=3e-2)
    p.add_argument("--norm-lr", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = _args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.finetune_text is not None:
        finetune_texts = [t.strip() for t in args.finetune_text.read_text(encoding="utf-8").splitlines() if t.strip()]
    elif WORDNET_NOUNS.is_file():
        finetune_texts = wordnet_glosses()
    else:
        raise SystemExit(f"error: {WORDNET_NOUNS} not found (Debian: wordnet-base); give --finetune-text FILE")
    report = run(python_docstrings(), finetune_texts, args)
    print(
        f"pretrained a {report['params'] / 1e6:.2f} M-parameter Llama on {report['pretrain_rows']} rows of Python "
        f"docstrings in {report['pretrain_seconds']:.0f} s (perplexity there "
        f"{report['pretrained_perplexity_on_pretrain_text']:.1f})"
    )
    print(
        f"fine-tuning on {report['finetune_rows']} rows, perplexity on {report['eval_rows']} held-out rows: "
        f"{report['before']:.1f} before"
    )
    for method, r in report["methods"].items():
        print(
            f"  {method:5s} {r['trainable']:7,d} trainable  lr {r['lr']:g}  perplexity {r['perplexity']:7.1f}  "
            f"({r['seconds']:.0f} s)"
        )


if __name__ == "__main__":
    main()
