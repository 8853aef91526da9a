"""Causal-LM data (fps_cli.tasks.causal_lm): TRL's SFT formats, labels -100 outside the loss, the bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llm import CHAT_TEMPLATE, GENERATION_TEMPLATE, UNSPLITTABLE_TEMPLATE, make_tokenizer, tiny_llama_config

from fps_cli.errors import DataError, ModelError
from fps_cli.tasks import causal_lm as lm

CHAT = [
    {"role": "system", "content": "answer"},
    {"role": "user", "content": "what is two plus three"},
    {"role": "assistant", "content": "five"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi how are you"},
]


def _learned(tokenizer, item):
    return [tokenizer.convert_ids_to_tokens(t) for t in item.labels if t != lm.IGNORE_INDEX]


def _record(fields, where="data.jsonl:1"):
    return lm.parse_record(fields, where)


def _write(path, lines):
    """One line per entry: an object as JSON, a string as it is."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_text_is_learned_in_full_with_bos_and_eos():
    tok = make_tokenizer()
    item = lm.tokenize(tok, _record({"text": "the cat sat"}), max_length=64)
    assert tok.convert_ids_to_tokens(item.input_ids) == ["<s>", "the", "cat", "sat", "</s>"]
    assert item.labels == item.input_ids


def test_prompt_completion_learns_the_completion_and_eos_only():
    tok = make_tokenizer()
    record = _record({"prompt": "what is two plus three", "completion": "five"})
    item = lm.tokenize(tok, record, max_length=64)
    assert tok.convert_ids_to_tokens(item.input_ids) == ["<s>", "what", "is", "two", "plus", "three", "five", "</s>"]
    assert _learned(tok, item) == ["five", "</s>"]
    assert item.labels[:6] == [lm.IGNORE_INDEX] * 6
    everything = lm.tokenize(tok, record, max_length=64, train_on_inputs=True)
    assert everything.labels == everything.input_ids


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, GENERATION_TEMPLATE], ids=["prefix-rendering", "generation-tags"])
def test_messages_learn_the_assistant_turns_only(template):
    tok = make_tokenizer(chat_template=template)
    item = lm.tokenize(tok, _record({"messages": CHAT}), max_length=128)
    assert _learned(tok, item) == ["five", "</s>", "hi", "how", "are", "you", "</s>"]
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert item.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    everything = lm.tokenize(tok, _record({"messages": CHAT}), max_length=128, train_on_inputs=True)
    assert everything.labels == everything.input_ids == item.input_ids


def test_both_ways_of_finding_assistant_turns_agree():
    plain = lm.tokenize(make_tokenizer(chat_template=CHAT_TEMPLATE), _record({"messages": CHAT}), 128)
    tagged = lm.tokenize(make_tokenizer(chat_template=GENERATION_TEMPLATE), _record({"messages": CHAT}), 128)
    assert plain == tagged


def test_a_template_that_cannot_mark_assistant_turns_is_an_error():
    tok = make_tokenizer(chat_template=UNSPLITTABLE_TEMPLATE)
    with pytest.raises(DataError, match=r"data.jsonl:1: the tokenizer's chat template cannot mark assistant turns"):
        lm.tokenize(tok, _record({"messages": CHAT}), max_length=128)
    # Training on every token needs no turn boundaries.
    assert lm.tokenize(tok, _record({"messages": CHAT}), max_length=128, train_on_inputs=True).learned > 0


def test_messages_without_a_chat_template_is_an_error():
    tok = make_tokenizer(chat_template=None)
    with pytest.raises(DataError, match=r"data.jsonl:1: 'messages' need a chat template, and the tokenizer has none"):
        lm.tokenize(tok, _record({"messages": CHAT}), max_length=128)


def test_a_conversation_without_an_assistant_turn_is_an_error():
    with pytest.raises(DataError, match="no assistant turn"):
        lm.tokenize(make_tokenizer(), _record({"messages": CHAT[:2]}), max_length=128)


def test_nothing_left_to_learn_after_truncation_is_an_error():
    tok = make_tokenizer()
    record = _record({"prompt": "what is two plus three", "completion": "five"})
    with pytest.raises(DataError, match=r"data.jsonl:1: nothing left to learn after truncation to --max-length 4 "):
        lm.tokenize(tok, record, max_length=4)
    kept = lm.tokenize(tok, record, max_length=7)  # the completion survives, its EOS does not
    assert _learned(tok, kept) == ["five"]


def test_bad_records_name_file_line_and_fix(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "the cat"}, "", "{not json"])
    with pytest.raises(DataError, match=r"d.jsonl:3: invalid JSON \(Expecting property name"):
        lm.read_jsonl(path)
    _write(path, [{"text": "a"}, "", {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:3: none of the known fields \(fields: answer, question\)"):
        lm.read_jsonl(path)
    _write(path, [{"prompt": "what is two", "completion": "  "}])
    with pytest.raises(DataError, match=r"d.jsonl:1: empty completion"):
        lm.read_jsonl(path)
    _write(path, [{"prompt": "what"}])
    with pytest.raises(DataError, match=r"no 'completion'"):
        lm.read_jsonl(path)
    _write(path, [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"messages\[0\] is not an object with string 'role' and 'content'"):
        lm.read_jsonl(path)


def test_a_tokenizer_without_pad_pads_with_eos_and_says_so():
    tok = make_tokenizer(pad=False)
    assert tok.pad_token_id is None
    notice = lm.ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id
    assert notice == "the tokenizer has no pad token: padding with its end-of-sequence token '</s>'"
    assert lm.ensure_pad_token(tok) is None
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ModelError, match="no pad token and no end-of-sequence token"):
        lm.ensure_pad_token(tok)


def test_folder_of_jsonl_and_txt_and_train_val_split(tmp_path):
    _write(tmp_path / "a.jsonl", [{"text": "the cat"}, {"prompt": "hi", "completion": "hello"}])
    (tmp_path / "b.txt").write_text("the dog sat\n\nred sky\n")
    train, val = lm.data_files(tmp_path)
    assert [p.name for p in train] == ["a.jsonl", "b.txt"] and val == []
    records = lm.read_records(train)
    assert [r.kind for r in records] == ["text", "prompt-completion", "text", "text"]
    assert records[3].fields["text"] == "red sky" and records[3].where.endswith("b.txt:3")
    _write(tmp_path / "train.jsonl", [{"text": "the cat"}])
    _write(tmp_path / "validation.jsonl", [{"text": "the dog"}])
    train, val = lm.data_files(tmp_path)
    assert [p.name for p in train] == ["train.jsonl"] and [p.name for p in val] == ["validation.jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl or \.txt file in"):
        lm.data_files(tmp_path / "empty")


def test_packing_cuts_the_stream_into_full_rows_and_drops_those_with_nothing_to_learn():
    tok = make_tokenizer()
    records = [_record({"text": "the cat sat on the mat"}), _record({"prompt": "what is two", "completion": "five"})]
    items, _ = lm.tokenize_all(tok, records, max_length=64)
    assert [len(i.input_ids) for i in items] == [8, 6]
    rows = lm.pack(items, max_length=4)
    # 14 tokens: rows 0-3, 4-7, 8-11 (<s> what is two: the prompt, nothing learned: dropped), 12-13 (five </s>).
    assert [len(r.input_ids) for r in rows] == [4, 4, 2]
    stream_ids = [t for i in items for t in i.input_ids]
    stream_labels = [t for i in items for t in i.labels]
    assert [t for r in rows for t in r.input_ids] == stream_ids[:8] + stream_ids[12:]
    assert [t for r in rows for t in r.labels] == stream_labels[:8] + stream_labels[12:]


def test_collate_pads_right_with_labels_ignored():
    tok = make_tokenizer()
    items, _ = lm.tokenize_all(tok, [_record({"text": "the cat sat"}), _record({"text": "red"})], max_length=64)
    batch = lm.collate(items, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"][1].tolist()[3:] == [lm.IGNORE_INDEX] * 2
    assert batch["input_ids"][1].tolist()[3:] == [tok.pad_token_id] * 2


def test_loss_and_perplexity_match_transformers_mean_over_counted_tokens():
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    records = [_record({"prompt": "what is two plus three", "completion": "five"}), _record({"text": "the cat sat"})]
    items, _ = lm.tokenize_all(tok, records, max_length=64)
    batch = lm.collate(items, tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok))).eval()
    with torch.no_grad():
        out = model(**batch)
    nll, count = lm.loss_sums(out.logits, batch["labels"])
    assert int(count) == 2 + 4  # five </s>; cat sat </s> after <s> ... each label predicted from the one before
    torch.testing.assert_close(lm.loss(out.logits, batch), out.loss)
    metrics = lm.summarize({"nll": float(nll), "tokens": int(count)})
    assert metrics["perplexity"] == pytest.approx(float(torch.exp(out.loss)), rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_roles_select_the_decoder_linears_and_train_nothing_in_full(tied):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(64, tie_word_embeddings=tied))
    roles = lm.roles(model, train_bias=True)
    assert roles.fully_trainable == []
    assert all(".layers." in name for name in roles.candidates) and len(roles.candidates) == 2 * 7
    assert "lm_head.weight" not in roles.candidates and "model.embed_tokens.weight" in roles.frozen
    assert ("lm_head.weight" in roles.frozen) is not tied  # tied: one parameter, listed once as embed_tokens


def test_the_statistics_forward_asks_for_the_last_position_only():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(64)).eval()
    batch = {"input_ids": torch.randint(0, 64, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        out = lm.statistics_forward(model, batch)
        full = model(**batch).logits
    assert out.logits.shape == (2, 1, 64)
    torch.testing.assert_close(out.logits[:, 0], full[:, -1])
