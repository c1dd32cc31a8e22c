"""Prompt sources by name (issue 14): the streaming ShareGPT parser, the id splits, multi-turn regeneration by the
target in the context of its own answers (and its resumption), multi-turn training spans, the HumanEval refusal,
and bench --suite with the machine it ran on. Every file is built in the test; the models are conftest's tiny ones
with a character-level chat tokenizer of the same 96-token vocabulary."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import COMMON, VOCAB, make_drafter, make_target
from hypothesis import given, settings
from hypothesis import strategies as st

import dflash_hf.cli as cli
import dflash_hf.training.data as data_module
import dflash_hf.training.options as options
import dflash_hf.training.prompt_sources as sources
from dflash_hf.machine import describe_cpu, parse_cpuinfo
from dflash_hf.training.data import chat_ids, generate_responses, load_records, regenerate, write_shards
from dflash_hf.training.prompt_sources import ParseReport, iter_json_array, load_sharegpt, split_of
from dflash_hf.training.trainer import (
    FeatureDataset,
    TrainConfig,
    anchor_label_ends,
    extract_features,
    sample_anchors,
    train_drafter,
)

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DATASET_ANSWER = "DATASET ANSWER QQQ"


def char_tokenizer():
    """A character-level chat tokenizer of exactly VOCAB ids: 3 specials, newline and 92 printable characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [c for c in string.printable[:95] if c not in "\t\n\r\x0b\x0c"][: VOCAB - len(SPECIALS) - 1]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    assert len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                        additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def sharegpt_record(conversation_id: str, *turns: str, first: str = "human") -> dict:
    messages = []
    for index, turn in enumerate(turns):
        messages.append({"from": first if index == 0 else "human", "value": turn})
        messages.append({"from": "gpt", "value": DATASET_ANSWER})
    return {"id": conversation_id, "conversations": messages}


# ---------------------------------------------------------------------------------------------------------------
# The streaming parser
# ---------------------------------------------------------------------------------------------------------------
def cut_sharegpt_file(path: Path, records: list[dict], cut_record: dict, keep_chars: int) -> int:
    """Write ``records`` as a pretty JSON array followed by the first ``keep_chars`` characters of ``cut_record``
    (the file ends there); returns the byte offset at which the cut record starts."""
    head = "[\n  " + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in records) + ",\n  "
    path.write_bytes((head + json.dumps(cut_record, ensure_ascii=False)[:keep_chars]).encode("utf-8"))
    return len(head.encode("utf-8"))


FILTER_CASES = [
    sharegpt_record("keep_a_0", "Bonjour, ça va? 中文也可以", "And a second question"),
    sharegpt_record("gpt_first_1", "answer first", first="gpt"),
    {"id": "empty_0", "conversations": []},
    sharegpt_record("long_0", "x" * 300),
    {"id": "nontext_0", "conversations": [{"from": "human", "value": ["not", "text"]}]},
    sharegpt_record("blank_0", "   "),
    sharegpt_record("keep_b_0", "What is 2 + 2?"),
    sharegpt_record("keep_a_0", "a duplicate id"),
    sharegpt_record("shortened_0", "fine first turn", "y" * 300, "never reached"),
    {"id": "system_0", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}]},
]


@pytest.mark.parametrize("chunk_bytes", [5, 64, 1 << 20])
def test_sharegpt_parser_recovers_every_complete_record_of_a_cut_file(chunk_bytes, tmp_path):
    path = tmp_path / "cut.json"
    cut_at = cut_sharegpt_file(path, FILTER_CASES, sharegpt_record("cut_0", "never complete é"), keep_chars=40)
    report = ParseReport(str(path), path.stat().st_size)
    assert list(iter_json_array(path, report, chunk_bytes=chunk_bytes)) == FILTER_CASES
    assert report.records == len(FILTER_CASES) and not report.complete
    assert report.stopped_at_byte == cut_at and report.file_bytes == path.stat().st_size
    assert "incomplete" in report.reason and f"stops at byte {cut_at} of" in report.describe()


def test_sharegpt_loader_counts_every_filtered_record_by_reason(tmp_path, monkeypatch):
    path = tmp_path / "cut.json"
    cut_sharegpt_file(path, FILTER_CASES, sharegpt_record("cut_0", "never complete"), keep_chars=30)
    loaded = load_sharegpt(path, max_chars=200)
    assert [c["id"] for c in loaded.conversations] == ["keep_a_0", "keep_b_0", "shortened_0"]
    assert loaded.conversations[0]["turns"] == ["Bonjour, ça va? 中文也可以", "And a second question"]
    assert loaded.conversations[2]["turns"] == ["fine first turn"]  # cut before its too-long second turn
    assert loaded.filtered == Counter({"first turn not human": 2, "empty conversation": 1, "non-text turn": 1,
                                       "first human turn longer than 200 characters": 1,
                                       "empty first human turn": 1, "duplicate id": 1})
    assert loaded.shortened == 1 and loaded.parse.records == len(FILTER_CASES)
    text = loaded.describe()
    assert "filtered out 7" in text and "first turn not human: 2" in text and "recovered 10 complete" in text


def test_complete_array_is_reported_complete(tmp_path):
    path = tmp_path / "whole.json"
    path.write_text(json.dumps([1, {"a": [2, 3]}, "x", 12345]))
    report = ParseReport(str(path), path.stat().st_size)
    assert list(iter_json_array(path, report, chunk_bytes=3)) == [1, {"a": [2, 3]}, "x", 12345]
    assert report.complete and report.stopped_at_byte is None


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.integers(min_value=0, max_value=50))
def test_split_is_a_function_of_the_conversation_and_parts_never_straddle(conversation, part):
    assert split_of(conversation) == split_of(conversation)
    assert split_of(f"{conversation}_{part}") == split_of(f"{conversation}_0")  # cleaned-split parts stay together


def test_split_is_stable_across_machines_and_sized_as_documented():
    # Pinned: sha256 is the same everywhere, so these may never change (a changed rule would leak test ids).
    pinned = {f"conv{i}": split_of(f"conv{i}") for i in range(2000)}
    assert [k for k, v in pinned.items() if v == "test"][:3] == ["conv91", "conv100", "conv114"]
    assert [k for k, v in pinned.items() if v == "validation"][:2] == ["conv11", "conv43"]
    counts = Counter(split_of(f"id-{i}") for i in range(20_000))
    assert 300 <= counts["test"] <= 500 and 300 <= counts["validation"] <= 500, counts


def test_no_test_conversation_is_ever_trained_on(tmp_path, monkeypatch):
    records = [sharegpt_record(f"c{i}_{i % 3}", f"question {i}", f"follow-up {i}", "third") for i in range(1500)]
    path = tmp_path / "share.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr(sources, "sharegpt_file", lambda: path)
    loaded = load_sharegpt(path)
    test_ids = {c["id"] for c in loaded.select("test")}
    assert test_ids and not test_ids & {c["id"] for c in loaded.select("train")}
    picked = sources.training_conversations("sharegpt", num=5000, seed=3, max_turns=2, log=None)
    assert picked and not {c["id"] for c in picked} & (test_ids | {c["id"] for c in loaded.select("validation")})
    assert all(len(c["turns"]) == 2 for c in picked)
    smaller = sources.training_conversations("sharegpt", num=10, seed=3, max_turns=2, log=None)
    assert smaller == picked[:10]  # a grown run extends its prompts, it does not redraw them
    bench = sources.bench_sample("sharegpt", log=None)
    assert set(bench) <= {c["turns"][0] for c in loaded.select("test")} and bench == sources.bench_sample(
        "sharegpt", log=None)


# ---------------------------------------------------------------------------------------------------------------
# Multi-turn regeneration
# ---------------------------------------------------------------------------------------------------------------
class AnswerSpy:
    """Wraps greedy regeneration's loop (``data.greedy_continuous``): records the prompts of every call (one per
    turn); can fail on the n-th call. ``restore()`` puts the loop back."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.inner, self.calls, self.fail_on_call = data_module.greedy_continuous, [], fail_on_call
        data_module.greedy_continuous = self

    def __call__(self, target, prompts, *args, **kwargs):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt("interrupted by the test")
        self.calls.append([list(p) for p in prompts])
        return self.inner(target, prompts, *args, **kwargs)

    def restore(self) -> None:
        data_module.greedy_continuous = self.inner


def greedy_answer(target, tokenizer, ids: list[int], new: int) -> list[int]:
    out = target.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)
    row = out[0, len(ids):].tolist()
    return row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row


def test_each_assistant_turn_is_conditioned_on_the_target_s_own_earlier_answers(tokenizer, tmp_path):
    target = make_target("llama")
    path = tmp_path / "share.json"
    path.write_text(json.dumps([sharegpt_record("conv_0", "Hi there", "Tell me more"),
                                sharegpt_record("solo_0", "One question only")]))
    conversations = load_sharegpt(path).conversations
    spy = AnswerSpy()
    try:
        records = list(generate_responses(target, tokenizer, conversations, max_new_tokens=6, batch_size=2))
    finally:
        spy.restore()

    first_ids = chat_ids(tokenizer, [{"role": "user", "content": "Hi there"}])
    first_answer = greedy_answer(target, tokenizer, first_ids, 6)  # the target alone, no batching
    own_text = tokenizer.decode(first_answer, skip_special_tokens=True).strip()
    record = records[0]
    assert record["turns"][0] == {"user": "Hi there", "assistant": own_text}
    second_ids = chat_ids(tokenizer, [{"role": "user", "content": "Hi there"},
                                      {"role": "assistant", "content": own_text},
                                      {"role": "user", "content": "Tell me more"}])
    assert len(spy.calls) == 2 and second_ids in spy.calls[1]  # turn 2 asked after the target's OWN answer
    asked = tokenizer.decode(second_ids)
    assert f"assistant\n{own_text}<|im_end|>" in asked and DATASET_ANSWER not in asked
    second_answer = greedy_answer(target, tokenizer, second_ids, 6)
    assert record["input_ids"] == second_ids + second_answer
    (start0, end0), (start1, end1) = record["response_spans"]
    assert start0 == len(first_ids) and record["input_ids"][start0:end0] == first_answer[: end0 - start0]
    assert end0 > start0 and (start1, end1) == (len(second_ids), len(record["input_ids"]))
    assert record["prompt_len"] == start0 and record["id"] == "conv_0"
    solo = records[1]
    assert solo["input_ids"] == chat_ids(tokenizer, [{"role": "user", "content": "One question only"}]) + \
        greedy_answer(target, tokenizer, solo["input_ids"][: solo["prompt_len"]], 6)


def _windowed_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(head_dim=8, use_sliding_window=True, sliding_window=3, layer_types=["sliding_attention", "full_attention"] * 2, **COMMON)
    model = Qwen3ForCausalLM(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "windowed qwen3"])
@pytest.mark.parametrize("batch_size", [4, 2, 1])
@pytest.mark.parametrize("room", [64, 1])
def test_rows_retire_and_waiting_ones_join_and_the_answers_stay_generate_s(family, batch_size, room, monkeypatch):
    """Prompts of four lengths; the stop token is one the target writes early in one row and late or never in the
    others, so rows finish at different steps: with 4 in flight the batch only shrinks, with 2 or 1 the waiting
    prompts join as rows leave (spliced into the running batch, or after it empties where a layer has a sliding
    window). Every answer is what ``generate`` writes for that prompt alone, and in its own padded batch."""
    target = _windowed_qwen3() if family == "windowed qwen3" else make_target(family)
    growing = data_module._growing_layer_class()
    monkeypatch.setattr(growing, "room", room)  # 1: the storage moves every 2 steps
    moves = []
    rehome = growing._rehome
    monkeypatch.setattr(growing, "_rehome", lambda self, needed: moves.append(needed) or rehome(self, needed))
    prompts = [[5, 9, 11, 3, 7, 21, 2], [8, 1], [30, 31, 32, 33], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
    free = [target.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
            for p in prompts]
    stop = free[0][2]  # row 0 stops at its third token
    assert sum(stop not in row[:6] for row in free[1:]) >= 2, "the test needs rows that outlive row 0"
    finished, merges = [], []
    merge = data_module._LiveBatch.merge
    monkeypatch.setattr(data_module._LiveBatch, "merge", lambda self, other: merges.append(other.rows) or
                        merge(self, other))
    pooled = data_module.greedy_continuous(target, prompts, 12, [stop], batch_size,
                                           progress=lambda rows, tokens: finished.append((rows, tokens)))
    full_layers = 2 if family == "windowed qwen3" else target.config.num_hidden_layers  # windowed: their own
    assert len(moves) >= full_layers * max(1, 12 // (room + 1))  # steps append into spare room, moved as it fills
    if family != "windowed qwen3" and batch_size == 2:
        assert merges  # a waiting prompt joined a running batch
    else:  # a sliding window cannot be spliced into; 4 in flight leave nobody waiting; 1 is never running beside
        assert merges == []
    for prompt, answer in zip(prompts, pooled):
        alone = target.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                                pad_token_id=0)[0, len(prompt):].tolist()
        assert answer == (alone[: alone.index(stop) + 1] if stop in alone else alone)
    assert len(pooled[0]) == 3 and pooled[0][-1] == stop
    assert sum(rows for rows, _ in finished) == 4 and sum(t for _, t in finished) == sum(map(len, pooled))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stop,
                              pad_token_id=0)[:, width:].tolist()
    for row, answer in zip(batched, pooled):
        assert answer == (row[: row.index(stop) + 1] if stop in row else row)
    assert data_module.greedy_continuous(target, prompts, 0, [stop], batch_size) == [[], [], [], []]


def test_the_continuous_loop_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        data_module.greedy_continuous(make_target("llama"), [[1, 2]], 4, [3], batch_size=0)


def test_generation_settings_that_change_greedy_leave_regeneration_to_generate(tokenizer):
    from transformers import GenerationConfig

    assert data_module.greedy_is_argmax(GenerationConfig(eos_token_id=3, max_new_tokens=9, temperature=0.7))
    for setting in ({"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 4},
                    {"suppress_tokens": [5]}):
        assert not data_module.greedy_is_argmax(GenerationConfig(**setting)), setting
    target = make_target("llama")
    target.generation_config.repetition_penalty = 1.5
    spy = AnswerSpy()
    try:
        records = list(generate_responses(target, tokenizer, ["hello there", "hi"], max_new_tokens=6, batch_size=2))
    finally:
        spy.restore()
    assert spy.calls == []  # generate answered, with the penalty
    for prompt, record in zip(["hello there", "hi"], records):
        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        assert record["input_ids"] == ids + greedy_answer(target, tokenizer, ids, 6)


def test_single_turn_prompts_keep_the_original_record_format(tokenizer):
    target = make_target("llama")
    records = list(generate_responses(target, tokenizer, ["a long prompt here", "hi"], max_new_tokens=4,
                                      batch_size=2))
    for prompt, record in zip(["a long prompt here", "hi"], records):  # input order, though sorted to batch
        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        assert record == {"prompt": prompt, "input_ids": ids + greedy_answer(target, tokenizer, ids, 4),
                          "prompt_len": len(ids)}


def conversations_for_resume() -> list[dict]:
    return [{"id": f"c{i}", "turns": [f"question {i}" + "?" * i, f"why {i}", "and?"][: 1 + i % 3]}
            for i in range(7)]


def test_interrupted_multi_turn_regeneration_resumes_to_the_same_records(tokenizer, tmp_path):
    target = make_target("llama")
    kwargs = dict(shard_size=2, max_new_tokens=5, batch_size=2, sort_window=2)
    regenerate(target, tokenizer, conversations_for_resume(), tmp_path / "whole", **kwargs)
    whole = load_records(tmp_path / "whole")
    assert [r["id"] for r in whole] == [f"c{i}" for i in range(7)]
    assert [len(r["turns"]) for r in whole] == [1, 2, 3, 1, 2, 3, 1]

    # Windows of 2 conversations: c0+c1 take calls 1-2 (turns 1, 2) and are written; c2+c3 fail at call 5 (c2's
    # third turn), after 6 answered turns, so their shard is not written.
    spy = AnswerSpy(fail_on_call=5)
    try:
        with pytest.raises(KeyboardInterrupt):
            regenerate(target, tokenizer, conversations_for_resume(), tmp_path / "run", **kwargs)
    finally:
        spy.restore()
    assert [p.name for p in sorted((tmp_path / "run").glob("shard-*"))] == ["shard-00000.jsonl"]
    log = [json.loads(line) for line in (tmp_path / "run" / "regeneration.jsonl").read_text().splitlines()]
    assert log[0]["turns"] == 6 and log[0]["new_tokens"] > 0 and log[0]["tokens_per_s"] > 0

    spy = AnswerSpy()
    try:
        regenerate(target, tokenizer, conversations_for_resume(), tmp_path / "run", **kwargs)
    finally:
        spy.restore()
    assert load_records(tmp_path / "run") == whole
    assert all("question 0" not in tokenizer.decode(row) for call in spy.calls for row in call)  # not redone
    assert regenerate(target, tokenizer, conversations_for_resume(), tmp_path / "run", **kwargs) == 0


# ---------------------------------------------------------------------------------------------------------------
# Training on multi-turn records
# ---------------------------------------------------------------------------------------------------------------
def test_single_span_anchors_are_drawn_as_before():
    for seed in range(5):
        new = sample_anchors(7, 40, 8, torch.Generator().manual_seed(seed), spans=[[7, 40]])
        old_rule = (torch.randperm(40 - 2 - 7 + 1, generator=torch.Generator().manual_seed(seed))[:8] + 7).sort()
        assert torch.equal(new, old_rule.values)


def test_multi_turn_anchors_and_labels_stay_inside_their_answer():
    spans = [[5, 12], [20, 26]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        anchors = sample_anchors(5, 26, 6, generator, spans=spans)
        inside = [(5 <= a <= 10) or (20 <= a <= 24) for a in anchors.tolist()]
        assert all(inside), anchors
        ends = anchor_label_ends(anchors, spans)
        assert ends.tolist() == [12 if a < 12 else 26 for a in anchors.tolist()]


def test_multi_turn_records_train_on_every_answer_span(tokenizer, tmp_path):
    target = make_target("llama", dtype=torch.float32)
    regenerate(target, tokenizer, conversations_for_resume()[:4], tmp_path / "data", shard_size=2,
               max_new_tokens=5, batch_size=2)
    drafter = make_drafter(target, block_size=4).float()
    extract_features(target, tmp_path / "data", tmp_path / "features", drafter.config.target_layer_ids)
    dataset = FeatureDataset(tmp_path / "features", min_response=1)
    records = load_records(tmp_path / "data")
    assert dataset.spans == [r["response_spans"] for r in records]
    assert any(len(spans) == 2 for spans in dataset.spans)
    result = train_drafter(drafter, target, dataset, tmp_path / "run", TrainConfig(steps=3, batch_size=2,
                           num_anchors=4, save_every=10))
    assert result["final_step"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])


def test_a_conversation_of_one_token_answers_is_left_out_of_training(tmp_path):
    """Two answers of one token each give 2 response tokens but no anchor (its next token would be in the next
    turn's prompt): the dataset leaves the record out instead of handing the trainer an empty block list."""
    target = make_target("llama", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    records = [
        {"input_ids": ids(12), "prompt_len": 3, "response_spans": [[3, 4], [8, 9]]},  # no anchor anywhere
        {"input_ids": ids(12), "prompt_len": 3, "response_spans": [[3, 4], [8, 12]]},  # anchors in the second
        {"input_ids": ids(12), "prompt_len": 3},
    ]
    write_shards(records, tmp_path / "data", shard_size=8)
    drafter = make_drafter(target, block_size=4).float()
    extract_features(target, tmp_path / "data", tmp_path / "features", drafter.config.target_layer_ids)
    dataset = FeatureDataset(tmp_path / "features")
    assert dataset.spans == [[[3, 4], [8, 12]], [[3, 12]]]
    result = train_drafter(drafter, target, dataset, tmp_path / "run", TrainConfig(steps=4, batch_size=2,
                           num_anchors=64, save_every=10))
    assert result["final_step"] == 4


# ---------------------------------------------------------------------------------------------------------------
# HumanEval is a benchmark
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["humaneval", "HumanEval", "openai/openai_humaneval", "FILE"])
def test_trainer_refuses_humaneval(source, tmp_path, capsys):
    if source == "FILE":
        source = str(tmp_path / "problems.jsonl")
        Path(source).write_text(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():"}) + "\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(tmp_path / "run"), "--prompts", source])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --prompts" in err and "benchmark" in err and "bench --suite humaneval" in err
    assert not (tmp_path / "run").exists()


def test_library_refuses_humaneval_as_training_data():
    with pytest.raises(ValueError, match="benchmark"):
        sources.training_conversations("humaneval", 10, log=None)


# ---------------------------------------------------------------------------------------------------------------
# bench --suite, and the machine in every bench JSON
# ---------------------------------------------------------------------------------------------------------------
def test_cpuinfo_fields_are_read_from_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
            "model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: other\n")
    facts = parse_cpuinfo(text)
    assert facts == {"cpu_model": "AMD EPYC 7B13", "cpu_family": 25, "cpu_model_number": 1, "avx2": True,
                     "avx512f": True, "avx512_bf16": False, "amx_bf16": False}
    assert describe_cpu(facts) == "AMD EPYC 7B13 (family 25, model 1, avx512_bf16 False)"  # the benchmarks' line


@pytest.fixture(scope="module")
def tiny_pair_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pair")
    target = make_target("llama", dtype=torch.float32)
    target.config.max_position_embeddings = 4096  # HumanEval stubs run to ~1000 characters, one token each here
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    make_drafter(target, block_size=4).float().save_pretrained(root / "drafter")
    return root / "target", root / "drafter"


def test_suite_names_agree():
    from dflash_hf.tools.suites import SUITES

    assert options.SUITE_NAMES == SUITES and options.TRAINING_SOURCE_NAMES == sources.TRAINING_SOURCES


def test_bench_suites_write_one_table_with_the_machine(tiny_pair_dirs, tmp_path, monkeypatch, capsys):
    test_ids = [f"t{i}" for i in range(400) if split_of(f"t{i}") == "test"][:3]
    path = tmp_path / "share.json"
    path.write_text(json.dumps([sharegpt_record(i, f"test question {i}") for i in test_ids]
                               + [sharegpt_record("train_only_0", "train question")]))
    monkeypatch.setattr(sources, "sharegpt_file", lambda: path)
    target_dir, drafter_dir = tiny_pair_dirs
    argv = ["bench", "--target", str(target_dir), "--drafter", str(drafter_dir), "--suite", "bench-prompts",
            "sharegpt-test", "humaneval", "--num-prompts", "2", "--max-new-tokens", "4", "--out", str(tmp_path),
            "--drafter-dtype", "float32"]  # not auto: what auto picks depends on this machine's timings
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "bench_suites.json").read_text())
    assert [row["suite"] for row in results["suites"]] == ["bench-prompts", "sharegpt-test", "humaneval"]
    for row in results["suites"]:
        assert row["prompts"] == 2 and row["lossless_prompts"] == 2 and row["mean_acceptance_length"] >= 1
        assert row["speedup"] > 0
    assert results["lossless"] and results["methods_compared"] == ["plain", "dflash"]
    sharegpt_prompts = [p["prompt"] for p in results["runs"]["sharegpt-test"]["per_prompt"]]
    assert all(p.startswith("test question") for p in sharegpt_prompts)
    assert results["runs"]["humaneval"]["per_prompt"][0]["prompt"].startswith("Complete the following Python")
    info = results["cpu_info"]
    assert {"cpu_model", "cpu_family", "cpu_model_number", "avx512_bf16"} <= set(info) and info["cpu_model"]
    assert results["dtype"] == "float32" and results["drafter_dtype"] == "float32" and results["threads"] >= 1
    assert results["torch_version"] == torch.__version__ and results["transformers_version"]
    out = capsys.readouterr().out
    assert "sharegpt-test" in out and "2/2" in out and "avx512_bf16" in out
    if (tmp_path / "bench_suites.png").exists():
        assert (tmp_path / "bench_suites.png").stat().st_size > 1000


def test_plain_bench_json_records_the_machine_too(tiny_pair_dirs, tmp_path):
    target_dir, drafter_dir = tiny_pair_dirs
    argv = ["bench", "--target", str(target_dir), "--drafter", str(drafter_dir), "--num-prompts", "1",
            "--max-new-tokens", "4", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert "plain" in results["methods"] and "prompt_lookup" in results["methods"]  # the default bench, unchanged
    assert results["cpu_info"]["cpu_family"] == parse_cpuinfo(Path("/proc/cpuinfo").read_text())["cpu_family"]


def test_bench_with_two_dtypes_runs_each_and_prints_them_side_by_side(tiny_pair_dirs, tmp_path, capsys):
    target_dir, drafter_dir = tiny_pair_dirs
    argv = ["bench", "--target", str(target_dir), "--drafter", str(drafter_dir), "--num-prompts", "2",
            "--max-new-tokens", "6", "--out", str(tmp_path), "--dtype", "float32", "bfloat16",
            "--drafter-dtype", "float32", "--num-speculative-tokens", "3"]
    code = cli.main(argv)
    out = capsys.readouterr().out
    by_dtype = {dtype: json.loads((tmp_path / dtype / "bench.json").read_text()) for dtype in ("float32", "bfloat16")}
    assert by_dtype["float32"]["lossless"]
    assert code == (0 if by_dtype["bfloat16"]["lossless"] else 1)  # a bfloat16 near-tie may flip a token
    for dtype, results in by_dtype.items():
        assert results["dtype"] == dtype
        assert set(results["methods"]) >= {"plain", "dflash", "dflash_lookup", "prompt_lookup"}
        control = results["plain_batch_of_two_mismatched_prompts"]  # the control ran: prompt indices, if any
        assert isinstance(control, list) and set(control) <= {0, 1}
        assert f"| {dtype} |" in out
    table = (tmp_path / "dtypes.md").read_text()
    assert table.splitlines()[0].startswith("| dtype | plain tok/s | DFlash (dflash-hf loop) |")
    assert "dflash 2/2" in table.splitlines()[2]  # the float32 row


def test_suite_refuses_options_it_does_not_use(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "humaneval", "--batch-size", "2"])
    assert "drop --batch-size" in capsys.readouterr().err
