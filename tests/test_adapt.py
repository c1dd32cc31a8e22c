"""`dflash-hf adapt` (issue 18): a drafter fine-tuned on its own recorded traffic accepts more on the held-out part
of it, judged online and side by side with the drafter it started from; the replay share, the recipe chain, the
verdict's tolerance and resuming are honoured; bad inputs fail with one clear line."""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import pytest
import torch
from conftest import COMMON, make_drafter
from test_prompt_sources import char_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

import dflash_hf.cli as cli
from dflash_hf.training.adapt import AdaptInputError, AdaptSpec, _verdict, run_adapt
from dflash_hf.training.data import chat_prompt_ids, write_shards
from dflash_hf.training.traffic import record_traffic
from dflash_hf.training.trainer import RECIPE_FILE, WARM_START_RECIPE

WORDS = ["sort", "list", "python", "loop", "code", "bug", "print", "class", "test", "file"]


def _requests(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(count)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A tiny float64 target folder (a character tokenizer), an untrained drafter of it with a recipe file, the
    traffic that drafter served, and a small 'original training data' folder to replay."""
    root = tmp_path_factory.mktemp("adapt")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    target = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **COMMON)).to(torch.float64).eval()
    target.generation_config.pad_token_id = target.generation_config.eos_token_id = None
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    drafter = make_drafter(target, block_size=4)
    drafter.save_pretrained(root / "base")
    (root / "base" / RECIPE_FILE).write_text(json.dumps({"command": "the base recipe"}))
    with record_traffic(drafter, root / "traffic"):
        for text in _requests(30, seed=0):
            ids = torch.tensor([chat_prompt_ids(tokenizer, text)])
            target.generate(ids, max_new_tokens=32, do_sample=False, assistant_model=drafter)
    original = []
    for text in _requests(10, seed=1):
        ids = torch.tensor([chat_prompt_ids(tokenizer, text)])
        out = target.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
        original.append({"prompt": text, "input_ids": out, "prompt_len": ids.shape[1]})
    write_shards(original, root / "original" / "data", shard_size=8)
    return root


def _spec(root: Path, out: str, **overrides) -> AdaptSpec:
    options = dict(traffic=root / "traffic", drafter=root / "base", out=root / out, target=str(root / "target"),
                   heldout_fraction=0.2, replay_data=root / "original", replay_fraction=0.25, steps=150,
                   batch_size=2, num_anchors=8, lr=3e-3, save_every=50, eval_prompts=2, max_new_tokens=16,
                   tolerance=1.0)
    return AdaptSpec(**{**options, **overrides})


def test_adapting_raises_acceptance_on_held_out_traffic_and_cites_the_base_recipe(deployment, capsys):
    report = run_adapt(_spec(deployment, "run"))
    out = deployment / "run"
    held = report["traffic_heldout"]
    assert held["requests"] == 6  # the newest 20 % of 30 calls
    assert held["adapted"]["mean_acceptance_length"] > held["base"]["mean_acceptance_length"] + 0.15, held
    for row in (held, *report["general"].values()):  # lossless: both drafters give plain greedy's tokens
        assert row["greedy_identical"] == row["greedy_requests"] == row["requests"]
    assert held["greedy_as_recorded"] == 6
    # The replay share: 24 older traffic records and 8 of the 10 original ones make 25 % of the mix.
    assert (report["data"]["train_traffic"], report["data"]["train_replay"]) == (24, 8)
    assert report["verdict"]["accepted"] and (out / "drafter" / "model.safetensors").is_file()
    assert not (out / "adapted-drafter").exists()
    recipe = json.loads((out / "drafter" / RECIPE_FILE).read_text())
    assert recipe["adapted from a drafter trained with"] == {"command": "the base recipe"}
    assert json.loads((out / WARM_START_RECIPE).read_text()) == {"command": "the base recipe"}
    assert "held-out traffic" in capsys.readouterr().out
    saved = json.loads((out / "adapt_report.json").read_text())
    assert saved["traffic_heldout"] == held

    # A rerun with a stricter tolerance keeps the data, weights and runs, and judges them again.
    evaluation = (out / "evaluation.json").stat().st_mtime_ns
    weights = (out / "drafter" / "model.safetensors").read_bytes()
    again = run_adapt(_spec(deployment, "run", tolerance=0.5))
    assert again["traffic_heldout"] == held and again["tolerance"] == 0.5
    assert (out / "evaluation.json").stat().st_mtime_ns == evaluation
    assert (out / "drafter" / "model.safetensors").read_bytes() == weights

    # Any other option is refused, naming each with both values: the folder's weights were made with its own.
    recipe = json.loads((out / "drafter" / RECIPE_FILE).read_text())
    with pytest.raises(AdaptInputError) as refused:
        run_adapt(_spec(deployment, "run", steps=50, lr=1e-2))
    assert "--steps 150 (this run: 50)" in str(refused.value) and "--lr 0.003 (this run: 0.01)" in str(refused.value)
    assert "only --tolerance may change" in str(refused.value)
    assert json.loads((out / "drafter" / RECIPE_FILE).read_text()) == recipe
    # The features hold the token ids of users' prompts: private, like the data they come from.
    assert stat.S_IMODE((out / "features").stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in (out / "features").iterdir()} == {0o600}


def _row(base: float, adapted: float, same: int = 3) -> dict:
    return {"requests": 3, "greedy_requests": 3, "greedy_identical": same, "relative_change": adapted / base - 1,
            "base": {"mean_acceptance_length": base}, "adapted": {"mean_acceptance_length": adapted}}


def test_the_verdict_refuses_a_general_drop_beyond_the_tolerance_and_any_lossy_row(deployment):
    spec = _spec(deployment, "unused", tolerance=0.03)
    assert _verdict(spec, _row(1.5, 1.8), {"bench-prompts": _row(2.0, 1.95)})["accepted"]  # -2.5 %
    refused = _verdict(spec, _row(1.5, 1.8), {"bench-prompts": _row(2.0, 1.9)})  # -5 %
    assert not refused["accepted"] and "bench-prompts 5.0%" in refused["reason"] and "--tolerance" in refused["reason"]
    lossy = _verdict(spec, _row(1.5, 1.8, same=2), {"bench-prompts": _row(2.0, 2.0)})
    assert not lossy["accepted"] and "differ" in lossy["reason"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"heldout_fraction": 0.0}, "heldout_fraction must be above 0"),
    ({"replay_data": None}, "needs replay_data"),
    ({"eval_suites": ("nope",)}, "unknown suite"),
    ({"steps": 0}, "steps must be positive"),
])
def test_bad_specs_say_what_is_wrong(deployment, overrides, message):
    with pytest.raises(ValueError, match=message):
        _spec(deployment, "bad", **overrides)


def test_the_command_reports_bad_inputs_in_one_line(deployment, tmp_path, capsys):
    empty = tmp_path / "no-traffic"
    empty.mkdir()
    argv = ["adapt", "--traffic", str(empty), "--drafter", str(deployment / "base"), "--target",
            str(deployment / "target"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "No traffic records" in capsys.readouterr().err
    assert cli.main([*argv[:3], "--drafter", str(deployment / "target"), *argv[5:]]) == 2  # a target is no drafter
    assert "DFlash" in capsys.readouterr().err
