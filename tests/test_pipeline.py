"""Training as a library: TrainSpec checks itself as the command does, and run_pipeline writes what
`dflash-hf train` writes."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import COMMON, make_drafter
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dflash_hf.cli as cli
import dflash_hf.training.options as options
from dflash_hf.training.data import load_records
from dflash_hf.training.default_pair import converted_target_dir
from dflash_hf.training.pipeline import TrainInputError, TrainSpec, run_pipeline, target_eos_ids, train_config
from dflash_hf.training.trainer import draft_vocabulary


def _options() -> dict:
    return {a.dest: a for a in options.train_parser()._actions if a.option_strings and a.dest != "help"}


def test_train_spec_has_one_field_per_train_option_with_the_command_s_default():
    fields = {f.name: f for f in dataclasses.fields(TrainSpec) if f.name != "command_line"}
    assert sorted(fields) == sorted(_options())
    for name, action in _options().items():
        default = fields[name].default
        assert (default is dataclasses.MISSING) if action.required else (default == action.default), name
    assert TrainSpec.from_args(options.train_parser().parse_args(["--out", "run"])) == TrainSpec(out="run")


# The option, as TrainSpec keywords and as command words, and what both say about it.
REFUSED = [
    ({"block_size": 1}, ["--block-size", "1"], "must be from 2 to 128, got 1"),
    ({"steps": -1}, ["--steps", "-1"], "must be at least 0, got -1"),
    ({"lr": 0.0}, ["--lr", "0"], "must be a finite number > 0, got 0"),
    ({"temperature": -0.5}, ["--temperature", "-0.5"], "must be a finite number >= 0, got -0.5"),
    ({"mask_token_id": -1}, ["--mask-token-id", "-1"], "must be at least 0, got -1"),
    ({"prompts": "data/missing.jsonl"}, ["--prompts", "data/missing.jsonl"], "data/missing.jsonl does not exist"),
    ({"prompts": "humaneval"}, ["--prompts", "humaneval"], "a benchmark"),
    ({"init_from": "/no/such/drafter"}, ["--init-from", "/no/such/drafter"], "the folder /no/such/drafter does not"),
    ({"openai_model": "m"}, ["--openai-model", "m"], "--openai-model names the model of an --openai-base-url server"),
    ({"gen_drafter": "org/d", "openai_base_url": "http://x"}, ["--gen-drafter", "org/d", "--openai-base-url",
                                                                 "http://x"], "drop one of them"),
    ({"init_from": "org/d", "init_from_target": True}, ["--init-from", "org/d", "--init-from-target"], "choose one"),
]


@pytest.mark.parametrize("kwargs, argv, message", REFUSED, ids=[" ".join(a) for _, a, _ in REFUSED])
def test_the_spec_refuses_what_the_command_refuses_with_the_same_words(kwargs, argv, message, tmp_path, capsys):
    with pytest.raises(ValueError) as info:
        TrainSpec(out=tmp_path / "run", **kwargs)
    assert message in str(info.value)
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(tmp_path / "run"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": "3"}, "steps (--steps): expected an integer, got '3'"),
    ({"num_anchors": 2.0}, "num_anchors (--num-anchors): expected an integer, got '2.0'"),
    ({"lr": True}, "lr (--lr): expected a number, got 'True'"),
    ({"seed": 1.5}, "seed (--seed): invalid int value: 1.5"),
    ({"num_prompts": None}, "num_prompts (--num-prompts) must be given (the command's default is 1000)"),
    ({"init_from_target": "yes"}, "init_from_target (--init-from-target): expected True or False, got 'yes'"),
    ({"gen_dtype": "int8"}, "gen_dtype (--gen-dtype): expected one of float32, bfloat16, float16, got 'int8'"),
    ({"mixed_precision": "fp16"}, "mixed_precision (--mixed-precision): expected one of no, bf16, got 'fp16'"),
    ({"openai_base_url": 8000}, "openai_base_url (--openai-base-url): expected a string, got 8000"),
])
def test_the_spec_refuses_values_of_the_wrong_type(kwargs, message, tmp_path):
    with pytest.raises(ValueError) as info:
        TrainSpec(out=tmp_path, **kwargs)
    assert str(info.value) == message


def test_the_spec_holds_values_as_the_command_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "target").mkdir()
    spec = TrainSpec(out=tmp_path / "run", target="~/target", lr=1)
    assert spec.target == str(tmp_path / "target") and spec.lr == 1.0 and isinstance(spec.lr, float)
    assert spec.out == str(tmp_path / "run")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 0  # a spec is checked once, when made: change it with dataclasses.replace (checked again)
    with pytest.raises(ValueError, match="must be at least 0"):
        dataclasses.replace(spec, steps=-1)


def test_as_command_is_a_command_line_that_gives_the_spec_back(tmp_path):
    spec = TrainSpec(out=tmp_path / "my run", num_prompts=3, lr=1e-3, init_from_target=True, gen_dtype="bfloat16",
                     mixed_precision="bf16", no_resume=True)
    words = shlex.split(spec.as_command())
    assert words[:4] == ["dflash-hf", "train", "--out", str(tmp_path / "my run")]
    assert "--steps" not in words  # left at its default
    assert TrainSpec.from_args(options.train_parser().parse_args(words[2:])) == spec


def test_train_config_takes_the_trainer_s_options():
    config = train_config(TrainSpec(out="run", steps=7, batch_size=3, num_anchors=5, lr=1e-3, seed=4, save_every=2,
                                    mixed_precision="bf16", max_new_tokens=9, temperature=0.5))
    assert (config.steps, config.batch_size, config.num_anchors, config.lr, config.seed, config.save_every,
            config.mixed_precision) == (7, 3, 5, 1e-3, 4, 2, "bf16")


# ---------------------------------------------------------------------------------------------------------------
# run_pipeline against the command, on a tiny target
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    """A 4-layer hidden-32 Llama with the default pair's tokenizer (and a vocabulary that fits it)."""
    folder = tmp_path_factory.mktemp("target") / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(converted_target_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(head_dim=8, **{**COMMON, "vocab_size": len(tokenizer)})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = folder.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello!", "Why is the sky blue?", "Hi")))
    return folder


def _train_argv(target: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--target", str(target), "--out", str(out), "--prompts", str(target.parent / "prompts.jsonl"),
            "--num-prompts", "3", "--max-new-tokens", "6", "--gen-batch-size", "2", "--num-layers", "1",
            "--num-taps", "2", "--block-size", "4", "--steps", "2", "--batch-size", "2", "--num-anchors", "2",
            "--save-every", "1", *extra]


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def _without_wall_times(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if not k.startswith("wall time")}


def test_run_pipeline_writes_what_the_command_writes(tiny_target, tmp_path, capsys):
    argv = _train_argv(tiny_target, tmp_path / "cli")
    torch.manual_seed(0)
    assert cli.main(argv) == 0
    printed_by_cli = capsys.readouterr().out.replace(str(tmp_path / "cli"), "RUN")
    spec = TrainSpec.from_args(options.train_parser().parse_args(_train_argv(tiny_target, tmp_path / "lib")[1:]),
                               command_line="dflash-hf " + " ".join(argv))
    torch.manual_seed(0)
    assert run_pipeline(spec) == tmp_path / "lib" / "drafter"
    assert capsys.readouterr().out.replace(str(tmp_path / "lib"), "RUN") == printed_by_cli

    cli_run, lib_run = tmp_path / "cli", tmp_path / "lib"
    assert _files(lib_run) == _files(cli_run)
    assert {"command.json", "prompts.jsonl", "timings.json", "training.json", "drafter/model.safetensors",
            "checkpoints/checkpoint-2/progress.json"} <= set(_files(cli_run))
    for name in ("command.json", "prompts.jsonl", "data/shard-00000.jsonl", "drafter/config.json"):
        assert (lib_run / name).read_bytes() == (cli_run / name).read_bytes(), name
    for name in ("drafter/model.safetensors", "features/features-00000.safetensors"):
        lib, ref = load_file(lib_run / name), load_file(cli_run / name)
        assert lib.keys() == ref.keys() and all(torch.equal(lib[k], ref[k]) for k in ref), name
    recipes = [json.loads((run / "training.json").read_text()) for run in (cli_run, lib_run)]
    assert _without_wall_times(recipes[1]) == _without_wall_times(recipes[0])
    assert recipes[1]["command"] == "dflash-hf " + " ".join(argv)


def test_a_library_run_records_its_equivalent_command_and_resumes(tiny_target, tmp_path, capsys):
    run = tmp_path / "run"
    spec = TrainSpec.from_args(options.train_parser().parse_args(_train_argv(tiny_target, run, "--steps", "0")[1:]))
    assert run_pipeline(spec) == run  # data and features only
    assert "(--steps 0: no training)" in capsys.readouterr().out
    assert json.loads((run / "command.json").read_text())["command"] == spec.as_command()
    assert not (run / "drafter").exists() and set(json.loads((run / "timings.json").read_text())) == {"data",
                                                                                                      "features"}
    shard = (run / "data" / "shard-00000.jsonl").read_bytes()
    assert run_pipeline(dataclasses.replace(spec, steps=2)) == run / "drafter"  # trains on what is there
    assert (run / "data" / "shard-00000.jsonl").read_bytes() == shard
    assert json.loads((run / "training.json").read_text())["steps × sequences per step × anchors per sequence"] \
        .startswith("2 × ")


def test_a_drafter_the_target_cannot_take_fails_before_anything_is_written(tiny_target, tmp_path):
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(head_dim=8, **{**COMMON, "num_hidden_layers": 8}))
    make_drafter(big).save_pretrained(tmp_path / "drafter")  # taps layers the 4-layer target lacks
    spec = TrainSpec(out=tmp_path / "run", target=str(tiny_target), init_from=str(tmp_path / "drafter"))
    with pytest.raises(TrainInputError, match="the target has only 4 decoder layers"):
        run_pipeline(spec)
    assert not (tmp_path / "run").exists()


def test_the_recipe_switches_reach_the_run(tiny_target, tmp_path):
    """--distill extracts the target's distribution with the features and trains on it; --draft-vocab-size cuts the
    drafter's head to the response tokens the target wrote most (with its end tokens: this target has none)."""
    run = tmp_path / "run"
    assert cli.main(_train_argv(tiny_target, run, "--distill", "0.5", "--draft-vocab-size", "5")) == 0
    teacher = load_file(run / "features" / "teacher-00000.safetensors")
    assert teacher["topk_ids_0"].shape[-1] == 16
    config = json.loads((run / "drafter" / "config.json").read_text())
    records = load_records(run / "data")
    assert config["draft_vocab"] == draft_vocabulary(records, 5) and len(config["draft_vocab"]) == 5
    progress = json.loads((run / "checkpoints" / "checkpoint-2" / "progress.json").read_text())
    assert progress["config"]["distill"] == 0.5
    recipe = json.loads((run / "training.json").read_text())
    assert recipe["distillation weight (against the target's top-16 distribution)"] == 0.5
    assert recipe["draft vocabulary (response tokens the target writes most)"] == len(config["draft_vocab"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--distill", "1.5"], "must be from 0 to 1, got 1.5"),
    (["--draft-vocab-size", "0"], "must be at least 1, got 0"),
])
def test_bad_recipe_switches_are_refused(tiny_target, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.main(_train_argv(tiny_target, tmp_path / "run", *argv))
    assert message in capsys.readouterr().err


def test_a_draft_vocabulary_keeps_the_target_s_end_tokens():
    target = LlamaForCausalLM(LlamaConfig(head_dim=8, **COMMON))
    target.generation_config.eos_token_id = [7, 9]
    assert target_eos_ids(target) == (7, 9)
    target.generation_config.eos_token_id = 4
    assert target_eos_ids(target) == (4,)
    records = [{"input_ids": [1, 2, 3, 3, 3], "prompt_len": 2}]
    assert draft_vocabulary(records, 1, target_eos_ids(target)) == [3, 4]


# ---------------------------------------------------------------------------------------------------------------
# Reruns: a folder keeps the options that made it; --seed fixes everything random, across processes
# ---------------------------------------------------------------------------------------------------------------
def _other_prompts(tmp_path: Path) -> Path:
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Bonjour", "Name a colour.", "Count to 3")))
    return other


def test_a_rerun_with_other_data_options_is_refused_naming_each_option_and_changes_nothing(tiny_target, tmp_path,
                                                                                         capsys):
    run = tmp_path / "run"
    assert cli.main(_train_argv(tiny_target, run, "--steps", "0")) == 0
    before = {name: (run / name).read_bytes() for name in ("command.json", "prompts.jsonl", "data_options.json")}
    other_target = tmp_path / "other-target"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(head_dim=8, **{**COMMON, "vocab_size": 49152})).save_pretrained(other_target)
    capsys.readouterr()
    argv = _train_argv(tiny_target, run, "--steps", "0", "--target", str(other_target), "--prompts",
                       str(_other_prompts(tmp_path)), "--max-new-tokens", "5")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--target {tiny_target} (this run: {other_target})" in err, err
    assert f"(this run: {tmp_path / 'other.jsonl'})" in err and "--max-new-tokens 6 (this run: 5)" in err, err
    assert "--num-prompts may grow" in err and "another --out folder" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    assert cli.main(_train_argv(tiny_target, run, "--steps", "0", "--num-prompts", "2")) == 2
    assert "--num-prompts 3 (this run: 2)" in capsys.readouterr().err
    assert cli.main(_train_argv(tiny_target, run, "--steps", "0", "--gen-batch-size", "3")) == 0  # only how it writes


def test_a_rerun_that_trains_resumes_only_with_the_options_of_its_checkpoints(tiny_target, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_train_argv(tiny_target, run)) == 0
    for extra, said in ((["--lr", "0.01"], "--lr 0.0006 (this run: 0.01)"),
                        (["--num-layers", "2"], "--num-layers 1 (this run: 2)"),
                        (["--block-size", "8"], "--block-size 4 (this run: 8)"),
                        (["--steps", "1"], "--steps 2 (this run: 1)")):
        capsys.readouterr()
        assert cli.main(_train_argv(tiny_target, run, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert said in err and "holds a drafter of 1 layer, block size 4" in err and "--no-resume" in err, err
    assert cli.main(_train_argv(tiny_target, run, "--steps", "3")) == 0  # steps may grow: it resumes
    assert [json.loads(line)["step"] for line in (run / "checkpoints" / "history.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    assert cli.main(_train_argv(tiny_target, run, "--lr", "0.01", "--no-resume")) == 0  # trains anew
    progress = json.loads((run / "checkpoints" / "checkpoint-2" / "progress.json").read_text())
    assert progress["config"]["lr"] == 0.01 and not (run / "checkpoints" / "checkpoint-3").exists()


def test_an_unrelated_data_shard_in_the_run_folder_is_refused_before_anything_is_written(tiny_target, tmp_path,
                                                                                      capsys):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "shard-00000.jsonl").write_text(json.dumps({"text": "someone else's data"}) + "\n")
    assert cli.main(_train_argv(tiny_target, run)) == 2
    assert "not a data shard written by dflash-hf" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["data"]


SEEDED_RUN = """
import sys
import dflash_hf.cli as cli
import dflash_hf.training.trainer as training
import torch
torch.manual_seed(int(sys.argv[1]))  # what ran before in the process must not matter
kill_after = int(sys.argv[2])
save = training._save_checkpoint
def save_then_die(accelerator, out_dir, step, *args, **kwargs):
    save(accelerator, out_dir, step, *args, **kwargs)
    if step == kill_after:
        import os
        os._exit(9)  # like a kill: no cleanup, nothing after the checkpoint
training._save_checkpoint = save_then_die
sys.exit(cli.main(sys.argv[3:]))
"""


def test_seed_fixes_the_new_drafter_and_a_killed_run_resumes_to_the_same_weights_in_new_processes(tiny_target,
                                                                                               tmp_path):
    """Two processes with the same command (and different global seeds before it) train the same drafter, and one
    killed after its second checkpoint then resumed by a new process ends with the same weights too."""
    import subprocess
    import sys

    def run(folder: str, global_seed: int, kill_after: int) -> int:
        argv = _train_argv(tiny_target, tmp_path / folder, "--steps", "4", "--save-every", "2")
        return subprocess.run([sys.executable, "-c", SEEDED_RUN, str(global_seed), str(kill_after), *argv],
                              capture_output=True, text=True, timeout=600).returncode

    assert run("straight", 1, 0) == 0
    assert run("seeded-again", 2, 0) == 0
    assert run("killed", 3, 2) == 9
    assert not (tmp_path / "killed" / "drafter").exists()
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-2").is_dir()
    assert run("killed", 4, 0) == 0
    straight = load_file(tmp_path / "straight" / "drafter" / "model.safetensors")
    for other in ("seeded-again", "killed"):
        weights = load_file(tmp_path / other / "drafter" / "model.safetensors")
        assert weights.keys() == straight.keys()
        assert all(torch.equal(weights[k], straight[k]) for k in straight), other
    log = (tmp_path / "killed" / "checkpoints" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]  # the killed process's steps kept
