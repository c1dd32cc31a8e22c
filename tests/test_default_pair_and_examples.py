"""The offline default pair, the CLI's main command, every example script and the notebook (short lengths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dflash_hf
from dflash_hf.cli import main as cli_main
from dflash_hf.training.default_pair import converted_target_dir, default_drafter_dir

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def pair():
    return dflash_hf.load_default_pair()


def test_default_pair_is_lossless_offline(pair):
    target, tokenizer, drafter = pair
    assert target.config.model_type == "llama" and target.config.num_hidden_layers == 30
    assert drafter.config.num_target_layers == 30
    for prompt in ["What is the capital of France?", "Give me two tips for sleeping better."]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        plain = target.generate(ids, max_new_tokens=24, do_sample=False)
        fast = target.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=drafter)
        assert torch.equal(plain, fast)


def test_default_drafter_gets_drafts_accepted(pair):
    from dflash_hf.tools.bench import load_prompt_file
    from dflash_hf.training.data import chat_prompt_ids

    target, tokenizer, drafter = pair
    lengths = []
    for text in load_prompt_file(None, limit=4):  # held-out prompts (the benchmark's)
        ids = torch.tensor([chat_prompt_ids(tokenizer, text)])
        target.generate(ids, max_new_tokens=48, do_sample=False, assistant_model=drafter)
        lengths += drafter.last_stats.acceptance_lengths
    # An untrained (or wrongly loaded) drafter stays at 1.0; the shipped one measures about 1.3 on these prompts.
    assert sum(lengths) / len(lengths) > 1.12, lengths


def test_regeneration_with_batched_dflash_writes_the_same_responses(pair):
    from dflash_hf.training.data import generate_responses

    target, tokenizer, drafter = pair
    prompts = ["Name a fruit.", "Write one sentence about the moon.", "What is 2 + 2?"]
    plain = list(generate_responses(target, tokenizer, prompts, max_new_tokens=16, batch_size=3))
    fast = list(generate_responses(target, tokenizer, prompts, max_new_tokens=16, batch_size=3,
                                   assistant_model=drafter))
    assert fast == plain
    assert len(drafter.last_stats.rows) == 3


def test_a_grown_run_adds_only_the_new_prompts(pair, tmp_path):
    from dflash_hf.training.data import load_records, regenerate
    from dflash_hf.training.trainer import FeatureDataset, extract_features

    target, tokenizer, _ = pair
    prompts = ["Name a fruit.", "What is 2 + 2?", "Name a colour.", "Name a planet.", "Name a river."]
    kwargs = dict(shard_size=2, max_new_tokens=6)
    regenerate(target, tokenizer, prompts[:3], tmp_path / "data", **kwargs)  # ends on a partial shard
    extract_features(target, tmp_path / "data", tmp_path / "features", [1, 2])
    old = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("features-*")}
    assert sorted(old) == ["features-00000.safetensors", "features-00001.safetensors"]

    regenerate(target, tokenizer, prompts, tmp_path / "data", **kwargs)
    records = load_records(tmp_path / "data")
    assert [r["prompt"] for r in records] == prompts  # none skipped, none repeated
    regenerate(target, tokenizer, prompts, tmp_path / "whole", **kwargs)
    assert records == load_records(tmp_path / "whole")
    extract_features(target, tmp_path / "data", tmp_path / "features", [1, 2])
    new = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("features-*")}
    assert {name: new[name] for name in old} == old and len(new) == 3  # only the new shard was extracted
    dataset = FeatureDataset(tmp_path / "features", min_response=1)
    assert [ids.tolist() for ids, _, _ in dataset.examples] == [r["input_ids"] for r in records]


def test_converted_target_is_cached_as_safetensors():
    folder = converted_target_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert converted_target_dir() == folder  # second call reuses it


def test_shipped_drafter_folder_is_complete():
    folder = default_drafter_dir()
    for name in ("config.json", "model.safetensors", "README.md", "modeling_dflash.py", "configuration_dflash.py",
                 "generation_dflash.py", "transformers_compat.py", "cache_dflash.py", "verify_dflash.py",
                 "matmul_dflash.py", "patch_dflash.py", "schedule_dflash.py", "pair_dflash.py", "draft_dflash.py",
                 "lookup_dflash.py"):
        assert (folder / name).is_file(), name


def test_the_demo_prompt_is_the_first_bench_prompt():
    from dflash_hf.cli import DEFAULT_PROMPT
    from dflash_hf.tools.suites import bench_prompts

    assert DEFAULT_PROMPT == bench_prompts(None, limit=1)[0]


def _demo_output(capsys, monkeypatch, argv: list[str]) -> str:
    """``dflash-hf demo`` as a fresh process would run it: the measured few-row plan (not the suite's
    always-the-routine one), empty."""
    import dflash_hf.core.matmul_dflash as core

    fresh = core.FewRowPlan()
    monkeypatch.setattr(core, "measured_plan", lambda: fresh)
    assert cli_main(["demo", *argv]) == 0
    return capsys.readouterr().out


def test_cli_demo_times_both_warm_and_calibrates_once(tmp_path, capsys, monkeypatch):
    import dflash_hf.tools.calibration as calibration

    monkeypatch.setattr(calibration, "cache_root", lambda: tmp_path)
    first = _demo_output(capsys, monkeypatch, ["--repeats", "1"])
    assert "Machine: " in first and "threads; target float32" in first
    assert "One-time calibration: " in first and str(tmp_path / "calibration") in first
    assert "identical to plain     : True (1 of 1 runs)" in first
    new_tokens = int(first.split("new tokens             : ")[1].split()[0])
    assert new_tokens >= 100  # the default prompt's answer is long enough to measure
    second = _demo_output(capsys, monkeypatch, ["--repeats", "1"])
    assert "One-time calibration" not in second and "0.0 s spent measuring" in second
    assert "met new products while timing" not in first + second
    recalibrated = _demo_output(capsys, monkeypatch, ["--repeats", "1", "--max-new-tokens", "8", "--recalibrate"])
    assert "One-time calibration: " in recalibrated


def test_cli_batched_bench(tmp_path, capsys):
    """Batched DFlash on the default pair: left-padded chat prompts, compared row by row with plain batched generate."""
    assert cli_main(["bench", "--batch-size", "1", "3", "--num-prompts", "3", "--max-new-tokens", "12",
                     "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench_batch.json").read_text())
    assert results["lossless"] and [row["batch_size"] for row in results["batches"]] == [1, 3]
    assert all(row["dflash_tokens_per_s"] > 0 and row["mean_acceptance_length"] >= 1 for row in results["batches"])
    assert (tmp_path / "bench_batch.png").stat().st_size > 1000
    assert "speedup" in capsys.readouterr().out


def test_cli_bench_with_a_bfloat16_drafter_reports_step_costs(tmp_path, capsys):
    """A bfloat16 drafter of the float32 target (both loops) stays lossless; the step cost explains the speedup."""
    assert cli_main(["bench", "--num-prompts", "2", "--max-new-tokens", "12", "--drafter-dtype", "bfloat16",
                     "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["lossless"] and results["dtype"] == "float32" and results["drafter_dtype"] == "bfloat16"
    cost = results["step_cost"]
    assert min(cost["plain_ms_per_token"], cost["draft_ms_per_step"], cost["verify_ms_per_step"]) > 0
    expected = (cost["draft_ms_per_step"] + cost["verify_ms_per_step"]) / cost["plain_ms_per_token"]
    assert abs(cost["break_even_acceptance_length"] - expected) < 0.01
    tau = results["methods"]["dflash"]["mean_acceptance_length"]
    control = tau * cost["two_row_forward_ms"] / (cost["draft_ms_per_step"] + cost["verify_ms_per_step"])
    assert cost["two_row_forward_ms"] > 0 and abs(cost["speedup_over_two_row_decode"] - control) < 0.01
    out = capsys.readouterr().out
    assert "pays off above acceptance length" in out and "(speculation alone)" in out


def test_gen_dtype_copy_is_made_only_when_there_is_something_to_write(tmp_path, monkeypatch):
    import dflash_hf.training.pipeline as pipeline

    copies = []  # models deep-copied (copy.deepcopy is used for configs too, which do not count)
    real_deepcopy = pipeline.copy.deepcopy

    def counting_deepcopy(obj, *rest):
        if isinstance(obj, torch.nn.Module):
            copies.append(type(obj).__name__)
        return real_deepcopy(obj, *rest)

    monkeypatch.setattr(pipeline.copy, "deepcopy", counting_deepcopy)
    args = ["train", "--out", str(tmp_path / "run"), "--num-prompts", "2", "--max-new-tokens", "8", "--steps", "0",
            "--num-layers", "1", "--gen-batch-size", "2", "--gen-dtype", "bfloat16"]
    assert cli_main(args) == 0
    assert copies == ["LlamaForCausalLM"]  # one bfloat16 writer for the prompts and the responses
    records = [json.loads(line) for line in (tmp_path / "run" / "data" / "shard-00000.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["input_ids"]) > r["prompt_len"] for r in records)
    assert cli_main(args) == 0  # resumed with nothing left to write: no second copy of the target
    assert copies == ["LlamaForCausalLM"]


def run_example(*args: str, stdin: str | None = None, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=OFFLINE_ENV, input=stdin, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_example_quickstart():
    assert "mean acceptance length" in run_example("examples/quickstart.py", "--offline", "--max-new-tokens", "16")


def test_example_chat_stream():
    assert run_example("examples/chat_stream.py", "--max-new-tokens", "12", stdin="Hello!\n").count("acceptance") == 1


def test_example_benchmark(tmp_path):
    run_example("examples/benchmark.py", "--num-prompts", "2", "--max-new-tokens", "16", "--out", str(tmp_path))
    results = json.loads((tmp_path / "bench.json").read_text())
    methods = {"plain", "dflash", "dflash_lookup", "transformers_dflash", "prompt_lookup"}
    assert results["lossless"] and set(results["methods"]) == methods
    assert results["methods"]["transformers_dflash"]["mean_acceptance_length"] >= 1
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_example_train_then_publish_dry_run(tmp_path):
    run_example("examples/train_drafter.py", "--out", str(tmp_path / "run"), "--num-prompts", "3",
                "--max-new-tokens", "12", "--steps", "3", "--num-layers", "1", "--gen-batch-size", "3",
                "--num-anchors", "4", "--save-every", "2")
    assert (tmp_path / "run" / "drafter" / "model.safetensors").is_file()
    recipe = json.loads((tmp_path / "run" / "training.json").read_text())
    assert recipe["prompts"] == 3 and recipe["drafter layers"] == 1
    assert recipe["command"].startswith("dflash-hf train --out ")
    assert recipe["steps × sequences per step × anchors per sequence"].startswith("3 × ")
    assert recipe["response tokens written by the target"] > 0
    first_timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    # --steps 0 prepares data and features only, and leaves the trained run as it was.
    run_example("examples/train_drafter.py", "--out", str(tmp_path / "run"), "--num-prompts", "3",
                "--max-new-tokens", "12", "--steps", "0", "--num-layers", "1", "--gen-batch-size", "3")
    assert json.loads((tmp_path / "run" / "training.json").read_text()) == recipe
    # Grown: one more prompt and two more steps on the same folder; wall times add up over the invocations.
    run_example("examples/train_drafter.py", "--out", str(tmp_path / "run"), "--num-prompts", "4",
                "--max-new-tokens", "12", "--steps", "5", "--num-layers", "1", "--gen-batch-size", "3",
                "--num-anchors", "4", "--save-every", "2")
    grown = json.loads((tmp_path / "run" / "training.json").read_text())
    assert grown["prompts"] == 4 and grown["sequences (prompt + the target's own response)"] == 4
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert all(timings[stage] > first_timings[stage] for stage in ("data", "training")), (first_timings, timings)
    out = run_example("examples/publish_drafter.py", str(tmp_path / "run" / "drafter"), str(tmp_path / "export"),
                      "--repo-id", "someone/tiny-dflash", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct",
                      "--training-json", str(tmp_path / "run" / "training.json"))
    assert "would upload" in out and "model.safetensors" in out and "training.json" in out
    # Warm-started from the published folder: the new recipe cites the earlier one.
    run_example("examples/train_drafter.py", "--out", str(tmp_path / "run2"), "--num-prompts", "3",
                "--max-new-tokens", "12", "--steps", "2", "--init-from", str(tmp_path / "export"),
                "--gen-batch-size", "3", "--num-anchors", "4")
    chained = json.loads((tmp_path / "run2" / "training.json").read_text())
    assert chained["warm-started from a drafter trained with"] == grown


def test_notebook_cells_run(tmp_path, monkeypatch):
    notebook = json.loads((ROOT / "examples" / "dflash_hf_colab.ipynb").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"SMOKE_TEST": True}
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
        exec(compile(code, "notebook-cell", "exec"), namespace)
    assert namespace["results"]["lossless"]
