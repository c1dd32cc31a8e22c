"""Traffic recording, log import and adaptation data (issue 18): the recorder stores exactly what generate returned
(one row, a batch, both loops) and never changes it; a call that raises leaves nothing; the folder's size bound
holds by deleting the oldest shards; recording off touches no file; OpenAI and vLLM logs become the same records
through the chat template, with turns the target would not have written greedily flagged; the held-out split is
the newest records and the replay mix has the share asked for."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_drafter, make_target
from test_batched import left_pad, prompts
from test_prompt_sources import char_tokenizer
from transformers import StoppingCriteria, StoppingCriteriaList

import dflash_hf
import dflash_hf.training.traffic as traffic
from dflash_hf.training.data import chat_ids, load_records, write_shards
from dflash_hf.training.traffic import ShardFolder, build_adapt_data, import_log, read_traffic, record_traffic


class StopOn(StoppingCriteria):
    """Stops a row once it generates ``token`` (a custom criterion: its rows end without EOS)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class RaiseAfter(StoppingCriteria):
    """Raises on its ``calls``-th call: a generate call that fails half-way."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self, input_ids, scores, **kwargs):
        self.calls -= 1
        if self.calls == 0:
            raise RuntimeError("client went away")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.fixture(scope="module")
def pair():
    target = make_target("qwen3")
    return target, make_drafter(target)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# 1. Recording
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["dflash", "transformers"])
@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=20)])
def test_one_row_record_is_what_generate_returned(pair, tmp_path, loop, sampling):
    target, drafter = pair
    ids = prompts((7,))[0][None]
    drafter.generation_loop = loop
    try:
        torch.manual_seed(3)
        unrecorded = target.generate(ids, max_new_tokens=11, assistant_model=drafter, **sampling)
        with record_traffic(drafter, tmp_path / "traffic") as recorder:
            torch.manual_seed(3)
            out = target.generate(ids, max_new_tokens=11, assistant_model=drafter, **sampling)
            stats = drafter.last_stats
    finally:
        drafter.generation_loop = "dflash"
    assert out.tolist() == unrecorded.tolist()  # recording changes nothing
    [record] = read_traffic(tmp_path / "traffic")
    assert record["prompt_ids"] == ids[0].tolist()
    assert record["prompt_ids"] + record["generated_ids"] == out[0].tolist()
    assert len(record["generated_ids"]) == 11
    assert record["acceptance_lengths"] == stats.acceptance_lengths and record["acceptance_lengths"]
    for name, value in sampling.items():
        assert record["sampling"][name] == value
    assert record["sampling"]["max_new_tokens"] == 11
    assert set(record) == {"time", "prompt_ids", "generated_ids", "sampling", "acceptance_lengths"}
    assert recorder.calls == 1 and recorder.records == 1


def test_batch_records_are_each_row_without_padding(pair, tmp_path):
    """Rows stop at different lengths, one by EOS and one by a custom criterion, padded with the EOS token: from
    the output alone the second row's end cannot be told from its padding; the records still hold each row exactly
    as plain generate returns it for that prompt alone."""
    target, drafter = pair
    rows = prompts((5, 9, 7), seed=4)
    free = [target.generate(r[None], max_new_tokens=14, do_sample=False)[0, r.shape[0]:].tolist() for r in rows]
    stop_token, eos = free[0][2], free[1][5]
    assert stop_token != eos
    settings = dict(max_new_tokens=14, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    alone = [target.generate(r[None], stopping_criteria=StoppingCriteriaList([StopOn(stop_token)]), **settings)[0]
             for r in rows]
    ids, mask = left_pad(rows, pad=eos)
    with record_traffic(drafter, tmp_path / "traffic"):
        out = target.generate(ids, attention_mask=mask, assistant_model=drafter,
                              stopping_criteria=StoppingCriteriaList([StopOn(stop_token)]), **settings)
        stats = drafter.last_stats
    plain = target.generate(ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([StopOn(stop_token)]),
                            **settings)
    assert out.tolist() == plain.tolist()
    records = read_traffic(tmp_path / "traffic")
    assert [r["prompt_ids"] + r["generated_ids"] for r in records] == [a.tolist() for a in alone]
    lengths = [len(r["generated_ids"]) for r in records]
    assert len(set(lengths)) > 1, "the rows must stop at different lengths for padding to show"
    stopped_by_criterion = records[0]["generated_ids"]
    assert stopped_by_criterion[-1] == stop_token and out[0, ids.shape[1] + len(stopped_by_criterion)] == eos
    for i, record in enumerate(records):
        width = ids.shape[1]
        assert out[i, width : width + lengths[i]].tolist() == record["generated_ids"]
        assert record["acceptance_lengths"] == stats.rows[i].acceptance_lengths


def test_a_call_that_raises_leaves_no_record(pair, tmp_path):
    target, drafter = pair
    ids = prompts((6,))[0][None]
    with record_traffic(drafter, tmp_path / "traffic") as recorder:
        with pytest.raises(RuntimeError, match="client went away"):
            target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=drafter,
                            stopping_criteria=StoppingCriteriaList([RaiseAfter(4)]))
        assert recorder.records == 0
        done = target.generate(ids, max_new_tokens=5, do_sample=False, assistant_model=drafter)
    assert [r["prompt_ids"] + r["generated_ids"] for r in read_traffic(tmp_path / "traffic")] == done.tolist()


def test_a_failed_shard_write_leaves_no_file_and_generate_still_returns(pair, tmp_path, monkeypatch):
    target, drafter = pair
    ids = prompts((6,))[0][None]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with record_traffic(drafter, tmp_path / "traffic", shard_bytes=64) as recorder:
        monkeypatch.setattr(os, "replace", disk_full)  # the atomic write's rename
        out = target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=drafter)
        monkeypatch.undo()
    assert out.shape == (1, 14)
    assert recorder.dropped_records == 1 and recorder.records == 0
    assert files_under(tmp_path / "traffic") == []  # the temporary file went with the failed write


def test_the_size_bound_holds_and_the_oldest_shards_go_first(pair, tmp_path):
    target, drafter = pair
    folder = tmp_path / "traffic"
    bound = 3000
    outputs = []
    with record_traffic(drafter, folder, max_bytes=bound, shard_bytes=1000) as recorder:
        for seed in range(14):
            ids = prompts((8,), seed=seed)[0][None]
            outputs.append(target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=drafter))
            assert recorder.shards.total_bytes() <= bound
    assert recorder.shards.total_bytes() <= bound
    kept = read_traffic(folder)
    assert recorder.shards_written > len(ShardFolder(folder, None).shards())  # some were rotated away
    assert 0 < len(kept) < len(outputs)
    # What is left is the newest calls, in order.
    assert [r["prompt_ids"] + r["generated_ids"] for r in kept] == [o[0].tolist() for o in outputs[-len(kept):]]


def test_a_record_larger_than_a_shard_is_dropped_not_written(pair, tmp_path):
    target, drafter = pair
    ids = prompts((40,))[0][None]
    with record_traffic(drafter, tmp_path / "traffic", max_bytes=100) as recorder:
        target.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=drafter)
    assert recorder.dropped_records == 1 and files_under(tmp_path / "traffic") == []


def test_recording_off_touches_no_file(pair, tmp_path, monkeypatch):
    target, drafter = pair
    ids = prompts((6,))[0][None]
    monkeypatch.chdir(tmp_path)

    def no_writes(*args, **kwargs):
        raise AssertionError("a traffic shard was written with recording off")

    monkeypatch.setattr(ShardFolder, "write", no_writes)
    target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=drafter)
    assert files_under(tmp_path) == []
    monkeypatch.undo()
    with record_traffic(drafter, tmp_path / "traffic"):
        target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=drafter)
    assert not hasattr(drafter, "traffic_recorder")  # removed on exit
    before = [(p, p.stat().st_mtime_ns) for p in files_under(tmp_path)]
    target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=drafter)
    assert [(p, p.stat().st_mtime_ns) for p in files_under(tmp_path)] == before


def test_record_traffic_refuses_what_cannot_record(pair, tmp_path, monkeypatch):
    target, drafter = pair
    with pytest.raises(TypeError, match="DFlash drafter"):
        with record_traffic(target, tmp_path / "t"):
            pass
    with record_traffic(drafter, tmp_path / "t"):
        with pytest.raises(RuntimeError, match="already recording"):
            with record_traffic(drafter, tmp_path / "u"):
                pass
    # A drafter whose remote code predates recording (its loop never calls the recorder) is refused, not ignored.
    old = types.ModuleType("old_remote_modeling")
    exec("def run_dflash_decoding(*args, **kwargs):\n    pass\n", old.__dict__)
    monkeypatch.setitem(sys.modules, old.__name__, old)
    old_class = type("DFlashDraftModel", (type(drafter),), {"__module__": old.__name__})
    original_class = drafter.__class__
    drafter.__class__ = old_class
    try:
        with pytest.raises(ValueError, match="predates traffic recording"):
            with record_traffic(drafter, tmp_path / "t"):
                pass
    finally:
        drafter.__class__ = original_class
    assert dflash_hf.record_traffic is record_traffic


# ---------------------------------------------------------------------------------------------------------------
# 2. Importing logs
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_openai_chat_log_round_trips_through_the_chat_template(tokenizer, tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "4,"},
                                                      {"type": "text", "text": "sure"}]}]
    pair_line = {"request": {"messages": [{"role": "user", "content": "Count"}], "temperature": 0.5, "max_tokens": 3},
                 "response": {"created": 1700000000,
                              "choices": [{"message": {"role": "assistant", "content": "123"},
                                           "finish_reason": "length"}]}}
    log = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation, "temperature": 0}, pair_line])
    report = import_log(log, tokenizer, tmp_path / "traffic")
    assert report.records == 3 and report.checked == 0 and not report.skipped
    records = read_traffic(tmp_path / "traffic")
    by_text = {tokenizer.decode(r["generated_ids"], skip_special_tokens=True): r for r in records}
    assert sorted(by_text) == ["123", "4,sure", "Hello."]
    eos = tokenizer.eos_token_id
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "4,sure"}
            for m in conversation]
    for k, text in ((2, "Hello."), (4, "4,sure")):
        record = by_text[text]
        assert record["prompt_ids"] == chat_ids(tokenizer, flat[:k])
        assert record["generated_ids"] == tokenizer(text, add_special_tokens=False).input_ids + [eos]
        full = chat_ids(tokenizer, flat[: k + 1], add_generation_prompt=False)
        assert full[: len(record["prompt_ids"]) + len(record["generated_ids"])] == \
            record["prompt_ids"] + record["generated_ids"]
        assert record["sampling"]["temperature"] == 0 and record["sampling"]["do_sample"] is False
        assert record["acceptance_lengths"] is None
    cut = by_text["123"]  # stopped by max_tokens: the target wrote no end-of-turn token
    assert cut["generated_ids"] == tokenizer("123", add_special_tokens=False).input_ids
    assert cut["prompt_ids"] == chat_ids(tokenizer, [{"role": "user", "content": "Count"}])
    assert cut["time"] == 1700000000 and cut["sampling"]["max_new_tokens"] == 3


def greedy_turn(target, tokenizer, question: str, new_tokens: int = 8) -> str | None:
    """The target's own greedy answer as text, when it is plain characters that tokenise back to the same ids."""
    asked = chat_ids(tokenizer, [{"role": "user", "content": question}])
    out = target.generate(torch.tensor([asked]), max_new_tokens=new_tokens, do_sample=False)[0, len(asked):].tolist()
    text = tokenizer.decode(out, skip_special_tokens=True)
    return text if tokenizer(text, add_special_tokens=False).input_ids == out else None


def test_import_flags_temperature_zero_turns_the_target_would_not_write(tokenizer, tmp_path):
    target = make_target("qwen3")  # the conftest vocabulary is the character tokenizer's
    question, answer = next((q, a) for q in ("Hi", "Tell me", "Why?", "What now", "ok") if
                            (a := greedy_turn(target, tokenizer, q)) is not None)
    altered = answer[:3] + ("x" if answer[3] != "x" else "y") + answer[4:]

    def line(text: str, temperature: float) -> dict:
        return {"request": {"messages": [{"role": "user", "content": question}], "temperature": temperature},
                "response": {"choices": [{"message": {"role": "assistant", "content": text},
                                          "finish_reason": "length"}]}}

    log = write_jsonl(tmp_path / "chat.jsonl", [line(answer, 0), line(altered, 0), line(altered, 0.8)])
    report = import_log(log, tokenizer, tmp_path / "kept", target=target)
    assert report.records == 3 and report.checked == 2
    [flag] = report.flagged
    assert flag["source"].endswith(":2") and flag["first_mismatch"] == 3
    assert flag["log_token"] == tokenizer.convert_tokens_to_ids(altered[3])
    assert flag["greedy_token"] == tokenizer.convert_tokens_to_ids(answer[3])
    dropped = import_log(log, tokenizer, tmp_path / "dropped", target=target, drop_flagged=True)
    assert dropped.records == 2 and len(read_traffic(tmp_path / "dropped")) == 2


def test_vllm_log_becomes_the_same_records(tokenizer, tmp_path):
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    params = ("SamplingParams(n=1, presence_penalty=0.0, repetition_penalty=1.0, temperature=0.0, top_p=1.0, "
              "top_k=0, min_p=0.0, seed=None, stop=[], max_tokens=16, min_tokens=0)")
    sampled = params.replace("temperature=0.0", "temperature=0.7").replace("top_k=0", "top_k=20")
    log = tmp_path / "vllm.log"
    log.write_text("\n".join([
        # newer vLLM: params at INFO, the full prompt in a DEBUG details line, output ids logged
        f"INFO 05-01 10:00:00 [logger.py:40] Received request chatcmpl-a: params: {params}, lora_request: None.",
        f"DEBUG 05-01 10:00:00 [logger.py:30] Request chatcmpl-a details: prompt: {prompt!r}, "
        f"prompt_token_ids: {prompt_ids}, prompt_embeds shape: None.",
        "INFO 05-01 10:00:01 [logger.py:60] Generated response chatcmpl-a (streaming delta): output: 'He', "
        "output_token_ids: [1], finish_reason: None",
        "INFO 05-01 10:00:01 [logger.py:60] Generated response chatcmpl-a (streaming complete): output: 'Hey', "
        f"output_token_ids: {tokenizer('Hey').input_ids + [tokenizer.eos_token_id]}, finish_reason: stop",
        # older vLLM: prompt text and ids in the INFO line; output text only
        f"INFO 04-12 22:07:44 [logger.py:39] Received request cmpl-b: prompt: {prompt!r}, params: {sampled}, "
        "prompt_token_ids: None, lora_request: None, prompt_adapter_request: None.",
        "INFO 04-12 22:07:45 [logger.py:42] Generated response cmpl-b: output: 'Yo!', finish_reason: stop",
        # no prompt logged at INFO level: cannot be imported
        f"INFO 05-01 10:00:02 [logger.py:40] Received request chatcmpl-c: params: {params}, lora_request: None.",
        "INFO 05-01 10:00:03 [logger.py:60] Generated response chatcmpl-c: output: 'x', finish_reason: stop",
        f"INFO 05-01 10:00:04 [logger.py:40] Received request chatcmpl-d: params: {params}, lora_request: None.",
    ]) + "\n")
    report = import_log(log, tokenizer, tmp_path / "traffic", log_format="vllm")
    assert report.records == 2 and sum(report.skipped.values()) == 2
    first, second = read_traffic(tmp_path / "traffic")
    eos = tokenizer.eos_token_id
    assert first["prompt_ids"] == prompt_ids and first["generated_ids"] == tokenizer("Hey").input_ids + [eos]
    assert first["sampling"]["temperature"] == 0 and first["sampling"]["max_new_tokens"] == 16
    assert first["sampling"]["top_k"] is None  # vLLM's 0 means no top-k
    assert second["prompt_ids"] == prompt_ids and second["generated_ids"] == tokenizer("Yo!").input_ids + [eos]
    assert second["sampling"]["temperature"] == 0.7 and second["sampling"]["top_k"] == 20


# ---------------------------------------------------------------------------------------------------------------
# 3. Adaptation data
# ---------------------------------------------------------------------------------------------------------------
def traffic_record(when: float, generated: int = 4) -> dict:
    return {"time": when, "prompt_ids": [1, 2, int(when) % 90], "generated_ids": list(range(10, 10 + generated)),
            "sampling": {"do_sample": False, "max_new_tokens": 8}, "acceptance_lengths": [2, 2]}


def write_traffic(folder: Path, records: list[dict], per_shard: int) -> None:
    shards = ShardFolder(folder, None)
    for start in range(0, len(records), per_shard):
        shards.write("".join(json.dumps(r) + "\n" for r in records[start : start + per_shard]))


def test_heldout_is_the_newest_traffic_and_the_replay_share_is_honoured(tmp_path):
    times = [7, 19, 3, 0, 12, 16, 1, 9, 18, 5, 14, 2, 11, 17, 6, 13, 4, 10, 15, 8]  # shards do not follow time
    records = [traffic_record(t) for t in times] + [traffic_record(0.5, generated=1)]  # too short to train on
    write_traffic(tmp_path / "traffic", records, per_shard=6)
    original = [{"prompt": f"p{i}", "input_ids": [3, 4, 5, 6, 7 + i], "prompt_len": 2} for i in range(100)]
    write_shards(original, tmp_path / "original", shard_size=30)

    summary = build_adapt_data(tmp_path / "traffic", tmp_path / "adapt", heldout_fraction=0.2,
                               replay_data_dir=tmp_path / "original", replay_fraction=0.5, seed=1, shard_size=7)
    heldout = load_records(tmp_path / "adapt" / "heldout")
    assert [r["time"] for r in heldout] == [15, 16, 17, 18, 19]
    assert len(heldout) == 5 == summary["heldout_records"]  # ceil(0.2 · 21)
    assert min(r["time"] for r in heldout) > max(r["time"] for r in load_records(tmp_path / "adapt" / "train")
                                                 if not r.get("replay"))
    train = load_records(tmp_path / "adapt" / "train")
    from_traffic = [r for r in train if not r.get("replay")]
    replayed = [r for r in train if r.get("replay")]
    assert len(from_traffic) == 15 and summary["dropped_short"] == 1  # 16 older records, one too short
    assert len(replayed) == 15 and summary["replay_share"] == 0.5
    originals = {tuple(r["input_ids"]) for r in original}
    assert all(tuple(r["input_ids"]) in originals for r in replayed)
    assert len({tuple(r["input_ids"]) for r in replayed}) == 15  # drawn without repeats
    for record in from_traffic:
        prompt_len = record["prompt_len"]
        assert record["response_spans"] == [[prompt_len, len(record["input_ids"])]]
        assert record["input_ids"][prompt_len:] == [10, 11, 12, 13]

    assert build_adapt_data(tmp_path / "traffic", tmp_path / "adapt", heldout_fraction=0.2,
                            replay_data_dir=tmp_path / "original", replay_fraction=0.5, seed=1,
                            shard_size=7) == summary  # a rerun finds the finished folder
    with pytest.raises(FileExistsError):
        build_adapt_data(tmp_path / "traffic", tmp_path / "adapt", heldout_fraction=0.3)


def test_replay_share_when_the_original_run_is_small():
    mix = traffic.replay_mix([traffic_record(t) for t in range(30)], [{"input_ids": [1, 2, 3]}] * 4, 0.25, seed=0)
    assert len(mix) == 34 and sum(1 for r in mix if r.get("replay")) == 4  # 10 wanted, 4 there
    exact = traffic.replay_mix([traffic_record(t) for t in range(30)], [{"input_ids": [i]} for i in range(50)], 0.25)
    assert sum(1 for r in exact if r.get("replay")) == 10  # 10 / 40 = 25 %
    assert traffic.replay_mix([traffic_record(0)], [{"input_ids": [1]}], 0.0) == [traffic_record(0)]


def test_recorded_traffic_becomes_features_and_heldout_requests(pair, tmp_path):
    """End to end on the tiny target: record, build adaptation data, extract its features, replay a request."""
    from dflash_hf.training.trainer import extract_features

    target, drafter = pair
    with record_traffic(drafter, tmp_path / "traffic"):
        for seed in range(5):
            ids, mask = left_pad(prompts((6, 9), seed=seed))
            target.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, assistant_model=drafter)
    summary = build_adapt_data(tmp_path / "traffic", tmp_path / "adapt", heldout_fraction=0.2)
    assert summary["traffic_records"] == 10 and summary["heldout_records"] == 2 and summary["train_records"] == 8
    assert extract_features(target, tmp_path / "adapt" / "train", tmp_path / "features",
                            drafter.config.target_layer_ids) == 1  # one data shard, one features file
    [(prompt_ids, kwargs), _] = list(traffic.iter_heldout_requests(tmp_path / "adapt"))
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 6
    assert not {"max_length", "temperature", "top_k", "top_p"} & set(kwargs)
    again = target.generate(torch.tensor([prompt_ids]), assistant_model=drafter, **kwargs)
    newest = read_traffic(tmp_path / "traffic")[-2]
    assert again[0].tolist() == newest["prompt_ids"] + newest["generated_ids"]
