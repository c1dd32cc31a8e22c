"""The drafter campaign's committed state: data shards that round-trip exactly and refuse anything else, slices that
never overlap and stop at their deadline, a ledger that accumulates across sessions and draws its plot."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import torch
from conftest import COMMON
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dflash_hf.cli as cli
import dflash_hf.training.options as options
import dflash_hf.training.prompt_sources as prompt_sources
from dflash_hf.training.campaign import (
    append_ledger_row,
    campaign_features,
    campaign_shards,
    choose_taps,
    committed_ids,
    cumulative,
    data_summary,
    has_native_bfloat16,
    read_campaign_shard,
    read_ledger,
    regenerate_slice,
    write_campaign_shard,
)
from dflash_hf.training.default_pair import converted_target_dir

RECORDS = [
    {"id": "a", "input_ids": [1, 5, 9, 40000, 7], "prompt_len": 2, "response_spans": [[2, 5]]},
    {"id": "b", "input_ids": [3, 3, 8, 2, 11, 12, 13], "prompt_len": 1, "response_spans": [[1, 3], [5, 7]]},
]


def test_a_shard_round_trips_its_records_and_provenance_exactly(tmp_path):
    path = write_campaign_shard(RECORDS, tmp_path / "shard-00000.safetensors.gz", {"source": "sharegpt"})
    records, provenance = read_campaign_shard(path)
    assert records == RECORDS and provenance == {"source": "sharegpt"}
    assert len(gzip.decompress(path.read_bytes())) < 1000  # uint16 ids: 2 bytes a token plus the header


def test_ids_past_uint16_are_kept_as_int32(tmp_path):
    wide = [{"id": "w", "input_ids": [70000, 1, 2**20], "prompt_len": 1, "response_spans": [[1, 3]]}]
    assert read_campaign_shard(write_campaign_shard(wide, tmp_path / "w.safetensors.gz", {}))[0] == wide


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b"gzip, but not safetensors")])
def test_a_damaged_shard_is_refused_with_the_way_out(tmp_path, content):
    path = tmp_path / "shard-00000.safetensors.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable campaign shard.*git checkout -- campaign/data"):
        read_campaign_shard(path)


def test_the_summary_counts_response_tokens_of_every_shard(tmp_path):
    write_campaign_shard(RECORDS[:1], tmp_path / "shard-00000.safetensors.gz", {})
    write_campaign_shard(RECORDS[1:], tmp_path / "shard-00001.safetensors.gz", {})
    assert committed_ids(tmp_path) == {"a", "b"}
    assert data_summary(tmp_path) == {"shards": 2, "conversations": 2, "response_tokens": 3 + 2 + 2}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(converted_target_dir())
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(head_dim=8, **{**COMMON, "vocab_size": len(tokenizer)})).eval()
    return target, tokenizer


def _conversations(count):
    return [{"id": f"c{i}", "turns": [f"Question number {i}?", "And then?"]} for i in range(count)]


def test_slices_never_overlap_and_each_shard_names_its_provenance(tiny_pair, tmp_path, monkeypatch):
    target, tokenizer = tiny_pair
    asked = []
    monkeypatch.setattr(prompt_sources, "training_conversations",
                        lambda name, num, seed=0, max_turns=2: asked.append(num) or _conversations(num))
    options = dict(source="sharegpt", max_turns=2, max_new_tokens=3, batch_size=2, shard_size=2,
                   deadline=time.time() + 600, log=lambda line: None)
    assert regenerate_slice(target, tokenizer, tmp_path, count=3, **options) == 3
    assert regenerate_slice(target, tokenizer, tmp_path, count=2, **options) == 2
    assert [p.name for p in campaign_shards(tmp_path)] == [f"shard-{k:05d}.safetensors.gz" for k in range(3)]
    assert committed_ids(tmp_path) == {f"c{i}" for i in range(5)}
    assert asked == [3, 5]  # the second slice asks past what is committed
    records, provenance = read_campaign_shard(tmp_path / "shard-00000.safetensors.gz")
    assert [r["id"] for r in records] == ["c0", "c1"]
    assert all(r["response_spans"][-1][1] == len(r["input_ids"]) for r in records)  # the last answer ends it
    assert provenance["source"] == "sharegpt" and provenance["split"] == "train"
    assert provenance["target_dtype"] == "float32" and provenance["sampling"] == "greedy"
    assert provenance["engine"].startswith("transformers ") and "family" in provenance["cpu"]


def test_a_slice_stops_at_its_deadline_after_whole_shards(tiny_pair, tmp_path, monkeypatch):
    target, tokenizer = tiny_pair
    monkeypatch.setattr(prompt_sources, "training_conversations",
                        lambda name, num, seed=0, max_turns=2: _conversations(num))
    written = regenerate_slice(target, tokenizer, tmp_path, source="sharegpt", count=6, max_turns=1,
                               max_new_tokens=2, batch_size=2, shard_size=2, deadline=time.time() - 1,
                               log=lambda line: None)
    assert written == 0 and not campaign_shards(tmp_path)


def test_features_cover_every_committed_shard_in_order_and_a_rerun_extracts_only_new_ones(tiny_pair, tmp_path):
    target, _ = tiny_pair
    data = tmp_path / "data"
    for k, records in enumerate((RECORDS[:1], RECORDS[1:])):
        write_campaign_shard([{**r, "input_ids": [i % 100 for i in r["input_ids"]]} for r in records],
                             data / f"shard-{k:05d}.safetensors.gz", {})
    lines = []
    folder, dtype, speeds = campaign_features(target, campaign_shards(data), tmp_path / "work", [0, 1],
                                              native_bf16=False, log=lines.append)
    assert dtype == torch.float32 and list(speeds) == [torch.float32] and "taps taken in float32" in lines[0]
    assert sorted(p.name for p in folder.glob("features-*")) == ["features-00000.safetensors",
                                                                 "features-00001.safetensors"]
    from dflash_hf.training.trainer import FeatureDataset

    second = FeatureDataset(folder, shards=[1])
    ids, taps, prompt_len = second[0]
    assert ids.tolist() == [i % 100 for i in RECORDS[1]["input_ids"]] and prompt_len == RECORDS[1]["prompt_len"]
    assert taps.shape == (len(ids), 2 * target.config.hidden_size)
    assert second.spans[0] == RECORDS[1]["response_spans"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("features-*")}
    write_campaign_shard([{**RECORDS[0], "id": "c", "input_ids": [4, 5, 6, 7, 8]}], data / "shard-00002.safetensors.gz", {})
    campaign_features(target, campaign_shards(data), tmp_path / "work", [0, 1], native_bf16=False, log=lines.append)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("features-*")}
    assert {k: after[k] for k in before} == before and "features-00002.safetensors" in after
    assert not FeatureDataset(folder).has_teacher
    campaign_features(target, campaign_shards(data), tmp_path / "work", [0, 1], native_bf16=False, log=lines.append,
                      teacher_top_k=4)  # a distillation row asks later: the taps stay, the distribution is added
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("features-*")} == after
    with_teacher = FeatureDataset(folder, shards=[1])
    top_ids, logprobs = with_teacher.teachers[0]
    assert top_ids.shape == logprobs.shape == (len(ids), 4)
    assert bool((logprobs[:, :-1] >= logprobs[:, 1:]).all())  # top-k, best first


def test_taps_on_the_fly_are_the_extracted_features_and_train_the_same_drafter(tiny_pair, tmp_path):
    from dflash_hf import DFlashDraftModel
    from dflash_hf.training.trainer import FeatureDataset, TapsOnTheFly, TrainConfig, train_drafter

    target, _ = tiny_pair
    data = tmp_path / "data"
    shards = [[{**RECORDS[1], "input_ids": [i % 100 for i in RECORDS[1]["input_ids"]]}],
              [{**r, "id": f"x{k}", "input_ids": [(i * 7 + k) % 100 for i in r["input_ids"]]}
               for k, r in enumerate(RECORDS * 2)] + [{"id": "short", "input_ids": [1, 2, 3], "prompt_len": 2}]]
    for k, records in enumerate(shards):
        write_campaign_shard(records, data / f"shard-{k:05d}.safetensors.gz", {})
    folder, _, _ = campaign_features(target, campaign_shards(data), tmp_path / "work", [0, 1], native_bf16=False,
                                     log=lambda line: None)
    extracted = FeatureDataset(folder)
    fly = TapsOnTheFly(target, {k: read_campaign_shard(path)[0] for k, path in enumerate(campaign_shards(data))},
                       [0, 1])
    assert len(fly) == len(extracted) == 5  # the 1-token answer is left out by both
    assert fly.spans == extracted.spans and fly.sources == extracted.sources and not fly.has_teacher
    for index in range(len(fly)):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's autocast never reaches the taps
            ids, taps, prompt_len = fly[index]
        want_ids, want_taps, want_len = extracted[index]
        assert torch.equal(ids, want_ids) and prompt_len == want_len
        assert taps.dtype == want_taps.dtype == torch.float16 and torch.equal(taps, want_taps)
    assert fly.tap_seconds > 0 and fly.tapped_tokens == sum(len(ids) for ids, _ in fly.examples)

    trained = []
    for dataset in (extracted, fly):
        torch.manual_seed(3)
        drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4, target_layer_ids=[0, 1])
        train_drafter(drafter, target, dataset, tmp_path / f"run-{len(trained)}",
                      TrainConfig(steps=3, batch_size=2, num_anchors=2, save_every=10**9), resume=False)
        trained.append(drafter.state_dict())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_taps_are_taken_on_the_fly_when_extracting_them_all_costs_more_steps():
    # 10 min to train, 1 s a step of which 0.4 s is taps: extracting for 5 min leaves 300 s / 0.6 s = 500 steps,
    # against 600 on the fly; extracting for 2 min leaves 800 steps.
    assert choose_taps(extract_s=300, train_s=600, step_s=1.0, tap_s=0.4) == ("on the fly", 600)
    assert choose_taps(extract_s=120, train_s=600, step_s=1.0, tap_s=0.4) == ("features", 800)
    assert choose_taps(extract_s=0, train_s=600, step_s=1.0, tap_s=0.4) == ("features", 1000)  # already extracted
    assert choose_taps(extract_s=900, train_s=600, step_s=1.0, tap_s=0.4) == ("on the fly", 600)
    assert choose_taps(extract_s=240, train_s=600, step_s=1.0, tap_s=0.4) == ("features", 600)  # a tie: extract


def _row(recipe, tokens, minutes, accept):
    return {"recipe": {"name": recipe}, "session": {"training_tokens": tokens, "steps": 10, "wall_minutes": minutes},
            "cumulative": {"training_tokens": tokens, "wall_minutes": minutes},
            "validation": {"started_from": {"mean_acceptance_length": 1.5},
                           "trained": {"mean_acceptance_length": accept}}}


def test_the_ledger_accumulates_per_recipe_and_draws_its_plot(tmp_path):
    append_ledger_row(tmp_path, _row("warm-start", 1000, 30.0, 1.6))
    append_ledger_row(tmp_path, _row("block-16", 500, 20.0, 1.4))
    append_ledger_row(tmp_path, _row("warm-start", 2000, 45.5, 1.7))
    assert [r["validation"]["trained"]["mean_acceptance_length"] for r in read_ledger(tmp_path)] == [1.6, 1.4, 1.7]
    assert cumulative(read_ledger(tmp_path), "warm-start") == {"training_tokens": 3000, "steps": 20,
                                                               "wall_minutes": 75.5}
    assert (tmp_path / "ledger.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("text", "seconds"), [("120m", 7200.0), ("2h", 7200.0), ("90s", 90.0), ("5400", 5400.0)])
def test_durations_read_as_written(text, seconds):
    assert options.duration(text) == seconds


@pytest.mark.parametrize(("budget", "message"), [("soon", "not a duration: 'soon'"), ("0m", "above zero"),
                                                 ("-5", "above zero")])
def test_a_bad_time_budget_is_a_usage_error(capsys, budget, message):
    with pytest.raises(SystemExit):
        cli.main(["campaign", "--time-budget", budget])
    assert message in capsys.readouterr().err


def test_native_bfloat16_is_read_from_the_cpu_flags():
    assert has_native_bfloat16({"avx512_bf16": True, "amx_bf16": False})
    assert has_native_bfloat16({"avx512_bf16": False, "amx_bf16": True})
    assert not has_native_bfloat16({"avx512_bf16": False, "amx_bf16": False})


def test_campaign_state_stays_out_of_the_wheel():
    from pathlib import Path

    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert not any(name.startswith("campaign") for name in config["tool"]["setuptools"]["packages"])
    assert json.dumps(config["tool"]["setuptools"]["package-dir"]).count("campaign") == 0


def test_the_best_drafter_is_kept_in_bfloat16_and_is_where_the_next_session_starts(tmp_path):
    from conftest import make_drafter, make_target

    from dflash_hf.core.modeling_dflash import DFlashDraftModel
    from dflash_hf.training.campaign import BEST_DRAFTER, campaign_best_dir, save_campaign_drafter

    assert campaign_best_dir(tmp_path) is None  # no session has beaten the shipped drafter yet
    drafter = make_drafter(make_target("qwen3", dtype=torch.float32))
    folder = save_campaign_drafter(drafter, tmp_path / BEST_DRAFTER)
    assert campaign_best_dir(tmp_path) == folder
    loaded = DFlashDraftModel.from_pretrained(folder, dtype=torch.float32)
    for name, value in drafter.state_dict().items():
        stored = loaded.state_dict()[name]
        assert stored.dtype == torch.float32
        assert torch.equal(stored, value.to(torch.bfloat16).float())  # bfloat16 on disk, upcast exactly on load
    assert not list(folder.glob("*.tmp*"))
