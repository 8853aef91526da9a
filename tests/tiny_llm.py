"""A tokenizer trained in the test and a tiny random Llama saved with it: causal-LM tests need no download."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Every turn ends with </s>; the generation prompt is the assistant tag, so a prefix rendering is a prefix.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# The same rendering, with the assistant content and its end marked for return_assistant_tokens_mask.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }} </s>"
    "{% endgeneration %} {% else %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Starts with the number of messages: a shorter conversation is no prefix of a longer one.
UNSPLITTABLE_TEMPLATE = "{{ messages | length }} " + CHAT_TEMPLATE

_WORDS = """the a cat dog sat on mat what is two plus three five answer question hello hi how are you fine thanks
red green blue sky grass apple tree river stone water fire one four six seven eight nine ten"""
WORDS = _WORDS.split()


def make_tokenizer(words=WORDS, chat_template: str | None = CHAT_TEMPLATE, pad: bool = True, bos: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (unknown words map to ``<unk>``), adding ``<s>`` in
    front of a text when ``bos``, with ``</s>`` as end of sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *dict.fromkeys(words)])}
    if pad:
        vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = chat_template
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    config = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def save_tiny_llama(folder: Path, tokenizer=None, seed: int = 0, **overrides) -> Path:
    """A random tiny ``LlamaForCausalLM`` saved with its tokenizer (``save_pretrained``) in ``folder``."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, **overrides)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
