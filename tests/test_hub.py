"""Hub export and publish: folder contents, model card, serving contract, atomicity, upload calls, token hygiene."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from dflash_hf import DFlashDraftModel
from dflash_hf.tools import hub

BASE = "Qwen/Qwen3-0.6B"
TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
BENCH = {
    "command": "dflash-hf bench --target tiny --num-prompts 3 --max-new-tokens 12",
    "target": "tiny-qwen3",
    "drafter": "tiny-drafter",
    "device": "cpu",
    "dtype": "float64",
    "max_new_tokens": 12,
    "num_prompts": 3,
    "transformers_version": "5.24.0",
    "torch_version": "2.9.0",
    "lossless": True,
    "methods": {
        "plain": {"tokens_per_s": 41.237, "speedup": 1.0, "mean_acceptance_length": None},
        "dflash": {"tokens_per_s": 97.481, "speedup": 2.364, "mean_acceptance_length": 3.571},
        "prompt_lookup": {"tokens_per_s": 50.604, "speedup": 1.227, "mean_acceptance_length": None},
        "transformers_dflash": {"tokens_per_s": 73.9, "speedup": 1.792, "mean_acceptance_length": 3.571},
    },
}


@pytest.fixture(scope="module")
def pair():
    target = make_target("qwen3")
    return target, make_drafter(target)


@pytest.fixture(scope="module")
def checkpoint(pair, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "drafter"
    pair[1].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("export")
    bench = work / "bench.json"
    bench.write_text(json.dumps(BENCH))
    return hub.export_drafter(checkpoint, work / "out", base_model=BASE, bench_json=bench,
                              model_name="acme/tiny-qwen3-dflash", training_summary={"steps": 10})


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------
def test_export_carries_the_recipe_and_renders_an_earlier_stage(checkpoint, tmp_path):
    recipe = {"command": "dflash-hf train --out b --init-from a", "steps": 20,
              "warm-started from a drafter trained with": {"command": "dflash-hf train --out a", "steps": 10}}
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, training_summary=recipe)
    assert json.loads((out / "training.json").read_text()) == recipe  # a warm-started run reads it back
    card = (out / "README.md").read_text()
    assert "| warm-started from a drafter trained with › command | dflash-hf train --out a |" in card
    assert "| steps | 20 |" in card and "| warm-started from a drafter trained with › steps | 10 |" in card
    assert hub.hub_folder_problems(out) == []
    bare = hub.export_drafter(checkpoint, tmp_path / "bare", base_model=BASE)
    assert not (bare / "training.json").exists()


def test_export_writes_a_hub_ready_folder(exported, pair):
    drafter = pair[1]
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "modeling_dflash.py", "configuration_dflash.py",
            "generation_dflash.py"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["DFlashDraftModel"]
    assert config["auto_map"] == {"AutoConfig": "configuration_dflash.DFlashConfig",
                                  "AutoModel": "modeling_dflash.DFlashDraftModel"}
    assert config["dflash_config"] == {"mask_token_id": drafter.config.mask_token_id,
                                       "target_layer_ids": drafter.config.target_layer_ids}
    assert config["block_size"] == 8 and config["num_target_layers"] == 4
    assert hub.check_serving_contract(exported) == []
    assert hub.hub_folder_problems(exported) == []
    assert oct(exported.stat().st_mode & 0o777) == oct(0o755)


def test_model_card_metadata_and_results_come_from_the_json(exported):
    card = ModelCard.load(exported / "README.md")
    assert card.data.base_model == BASE
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["dflash", "speculative-decoding", "block-diffusion", "draft-model"]
    text = card.text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) == len(BENCH["methods"])
    for row, name in zip(rows, ["plain", "dflash", "prompt_lookup", "transformers_dflash"]):
        result = BENCH["methods"][name]
        assert f"| {result['tokens_per_s']:.1f} | {result['speedup']:.2f}× |" in row
        mal = result["mean_acceptance_length"]
        assert row.endswith("| — |" if mal is None else f"| {mal:.2f} |")
    assert BENCH["command"] in text
    assert "matched it token for token" in text
    assert "`[2]` of 4" in text and "| mask token id | 95 |" in text and "| block size | 8 " in text
    assert '"num_speculative_tokens": 7' in text and '"model": "acme/tiny-qwen3-dflash"' in text
    assert "--speculative-algorithm DFLASH" in text and "--speculative-draft-model-path acme/tiny-qwen3-dflash" in text
    assert 'AutoModel.from_pretrained("acme/tiny-qwen3-dflash", trust_remote_code=True' in text
    assert "assistant_model=drafter" in text
    assert "| steps | 10 |" in text


def test_card_without_bench_json_says_nothing_was_measured(checkpoint, tmp_path):
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE)
    text = (out / "README.md").read_text()
    assert "No measurements were recorded" in text
    assert "×" not in text and "tokens/s" not in text
    assert "<your-org>/out" in text  # no repo id known: the snippets say so instead of inventing one


def test_card_names_the_drafter_dtype_the_bench_ran(checkpoint, tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(dict(BENCH, dtype="float32", drafter_dtype="bfloat16")))
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, bench_json=tmp_path / "b.json")
    assert "on `cpu` (`float32`, drafter in `bfloat16`)" in (out / "README.md").read_text()
    (tmp_path / "old.json").write_text(json.dumps(BENCH))  # a bench JSON from before it was recorded
    old = hub.export_drafter(checkpoint, tmp_path / "old", base_model=BASE, bench_json=tmp_path / "old.json")
    assert "on `cpu` (`float64`)," in (old / "README.md").read_text()


def test_card_reports_a_lossy_run(checkpoint, tmp_path):
    bench = dict(BENCH, lossless=False)
    (tmp_path / "b.json").write_text(json.dumps(bench))
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, bench_json=tmp_path / "b.json")
    assert "did NOT match plain greedy" in (out / "README.md").read_text()


def test_exported_folder_reloads_and_decodes_losslessly(exported, pair):
    target = pair[0]
    drafter = DFlashDraftModel.from_pretrained(exported, dtype=torch.float64).eval()
    for key, value in pair[1].state_dict().items():
        torch.testing.assert_close(drafter.state_dict()[key], value)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    fast = target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dflash_hf" or name.startswith("dflash_hf."):
                raise ImportError("dflash_hf is blocked in this process")

    sys.meta_path.insert(0, Block())
    from transformers import AutoModel, AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float64).eval()
    drafter = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64)
    assert type(drafter).__module__.startswith("transformers_modules"), type(drafter).__module__
    prompt = torch.tensor([[3, 14, 15, 92, 6, 5]])
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    fast = target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast), (plain, fast)
    print("REMOTE_OK")
    """
)


def test_exported_folder_runs_as_remote_code_without_dflash_hf(exported, pair, tmp_path):
    pair[0].save_pretrained(tmp_path / "target")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(exported), str(tmp_path / "target")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout


def test_export_is_atomic(checkpoint, tmp_path, monkeypatch):
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE)
    before = _snapshot(out)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the weights were written")

    monkeypatch.setattr(hub, "render_model_card", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        hub.export_drafter(checkpoint, out, base_model="other/model")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_export_replaces_an_earlier_export(checkpoint, tmp_path):
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE)
    (out / "stale.txt").write_text("from an earlier export")
    hub.export_drafter(checkpoint, out, base_model="other/model")
    assert not (out / "stale.txt").exists()
    assert ModelCard.load(out / "README.md").data.base_model == "other/model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_refuses_to_replace_a_foreign_folder(checkpoint, tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="does not look like an exported drafter"):
        hub.export_drafter(checkpoint, foreign, base_model=BASE)
    assert (foreign / "notes.txt").read_text() == "precious"


def test_export_rejects_bad_checkpoints(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not a drafter checkpoint folder"):
        hub.export_drafter(tmp_path, tmp_path / "out", base_model=BASE)
    pickled = _copy(checkpoint, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        hub.export_drafter(pickled, tmp_path / "out", base_model=BASE)
    renamed = _copy(checkpoint, tmp_path / "renamed")
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.fc.weight"] = tensors.pop("fc.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="fc.weight"):
        hub.export_drafter(renamed, tmp_path / "out", base_model=BASE)
    for inside in (checkpoint, checkpoint.parent):
        with pytest.raises(ValueError, match="would replace the checkpoint"):
            hub.export_drafter(checkpoint, inside, base_model=BASE)
    assert not (tmp_path / "out").exists()


def test_export_rejects_bench_json_of_another_drafter(checkpoint, tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(dict(BENCH, block_size=16)))
    with pytest.raises(ValueError, match="another drafter"):
        hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, bench_json=tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"methods": {}}))
    with pytest.raises(ValueError, match="dflash-hf bench"):
        hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, bench_json=tmp_path / "c.json")


def test_export_stores_drafts_per_step_and_checks_the_bench_against_it(checkpoint, tmp_path, pair):
    step_cost = {"plain_ms_per_token": 41.5, "draft_ms_per_step": 8.2, "verify_ms_per_step": 33.4,
                 "break_even_acceptance_length": 1.0, "two_row_forward_ms": 30.1, "speedup_over_two_row_decode": 1.01}
    (tmp_path / "b.json").write_text(json.dumps(dict(BENCH, drafts_per_step=3, block_size=8, step_cost=step_cost)))
    with pytest.raises(ValueError, match="verifying 3 drafts per step.*verifies 7.*--num-speculative-tokens 3"):
        hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, bench_json=tmp_path / "b.json")
    for bad in (0, 8):
        with pytest.raises(ValueError, match="--num-speculative-tokens must be from 1 to block_size - 1 = 7"):
            hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, num_speculative_tokens=bad)
    out = hub.export_drafter(checkpoint, tmp_path / "out", base_model=BASE, bench_json=tmp_path / "b.json",
                             num_speculative_tokens=3, model_name="acme/tiny-qwen3-dflash")
    assert json.loads((out / "config.json").read_text())["num_speculative_tokens"] == 3
    assert DFlashDraftModel.from_pretrained(out).num_speculative_tokens == 3
    assert hub.hub_folder_problems(out) == []
    card = (out / "README.md").read_text()
    assert "| drafts verified per step (default) | 3 (`num_speculative_tokens` in config.json" in card
    prose = " ".join(card.split())
    # vLLM's K is also its draft block (1 + K slots): the snippet drafts the whole trained block (tests/test_vllm_serving.py)
    assert '"num_speculative_tokens": 7}' in card and "still drafts the whole block and verifies only the first 3." in prose
    assert "8.2 ms of drafting and 33.4 ms of verification, against 41.5 ms per token" in prose
    assert "took 30.1 ms; against a plain decode paying that per token, DFlash would be 1.01×" in prose
    assert pair[1].num_speculative_tokens is None  # the in-memory model the checkpoint came from is untouched


def test_export_of_a_zlab_style_checkpoint_gets_our_remote_code(checkpoint, tmp_path):
    zlab = _copy(checkpoint, tmp_path / "zlab")
    for source in zlab.glob("*.py"):
        source.unlink()
    _edit_config(zlab, lambda c: c.update(auto_map={"AutoModel": "dflash.DFlashDraftModel"}))
    out = hub.export_drafter(zlab, tmp_path / "out", base_model=BASE)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_dflash.DFlashConfig",
                                  "AutoModel": "modeling_dflash.DFlashDraftModel"}


# ---------------------------------------------------------------------------------------------------------------
# serving contract
# ---------------------------------------------------------------------------------------------------------------
def test_serving_contract_flags_a_renamed_tensor(exported, tmp_path):
    folder = _copy(exported, tmp_path / "f")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.hidden_norm.weight"] = tensors.pop("hidden_norm.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    problems = hub.check_serving_contract(folder)
    assert any("hidden_norm.weight is missing" in p for p in problems)
    assert any("unexpected tensor model.hidden_norm.weight" in p for p in problems)


def test_serving_contract_flags_a_wrong_shape(exported, tmp_path):
    folder = _copy(exported, tmp_path / "f")
    _edit_config(folder, lambda c: c["dflash_config"].update(target_layer_ids=[1, 2]))
    assert any("fc.weight has shape [32, 32]" in p and "[32, 64]" in p for p in hub.check_serving_contract(folder))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.pop("dflash_config"), "dflash_config is missing"),
        (lambda c: c.update(architectures=["Qwen3Model"]), "architectures"),
        (lambda c: c.update(model_type="dflash_qwen3"), "model_type"),
        (lambda c: c["dflash_config"].update(mask_token_id=None), "mask_token_id"),
        (lambda c: c.pop("num_target_layers"), "num_target_layers"),
        (lambda c: c["dflash_config"].update(target_layer_ids=[9]), "reach beyond num_target_layers"),
        (lambda c: c["dflash_config"].update(block_size=16), "disagree"),
        (lambda c: c.update(target_hidden_size=64), "SGLang sizes fc"),
        (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[2]), "eagle_aux_hidden_state_layer_ids"),
        (lambda c: c.update(hidden_act="gelu"), "silu"),
    ],
)
def test_serving_contract_flags_config_problems(exported, tmp_path, edit, expected):
    folder = _copy(exported, tmp_path / "f")
    _edit_config(folder, edit)
    problems = hub.check_serving_contract(folder)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------------------------------------------
class RecordingApi:
    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail_with = fail_with

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))
        if self.fail_with is not None:
            raise self.fail_with


class ExplodingApi:
    def __getattr__(self, name):
        raise AssertionError(f"dry run touched the Hub API ({name})")


def test_publish_creates_the_repo_and_uploads_the_folder(exported):
    api = RecordingApi()
    files = hub.publish(exported, "acme/tiny-qwen3-dflash", private=True, api=api, commit_message="v1")
    assert files == sorted(p.name for p in exported.iterdir())
    (name1, args1, kwargs1), (name2, args2, kwargs2) = api.calls
    assert name1 == "create_repo"
    assert (args1 + (kwargs1.get("repo_id"),))[0] == "acme/tiny-qwen3-dflash"
    assert kwargs1["private"] is True and kwargs1["exist_ok"] is True and kwargs1["repo_type"] == "model"
    assert name2 == "upload_folder" and not args2
    assert kwargs2["repo_id"] == "acme/tiny-qwen3-dflash" and kwargs2["repo_type"] == "model"
    assert Path(kwargs2["folder_path"]) == exported and kwargs2["commit_message"] == "v1"
    assert kwargs2["allow_patterns"] == files


def test_publish_dry_run_makes_no_calls(exported):
    files = hub.publish(exported, "acme/x", dry_run=True, api=ExplodingApi())
    assert "model.safetensors" in files and "README.md" in files and "config.json" in files


def test_publish_refuses_pickles_and_unfinished_folders(exported, tmp_path):
    api = RecordingApi()
    folder = _copy(exported, tmp_path / "f")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle"):
        hub.publish(folder, "acme/x", api=api)
    (folder / "pytorch_model.bin").unlink()
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match="README.md"):
        hub.publish(folder, "acme/x", api=api)
    with pytest.raises(ValueError, match="org/name"):
        hub.publish(exported, "not a repo id", api=api)
    assert api.calls == []


def test_token_never_leaks(exported, capsys, caplog, monkeypatch):
    # A server error that echoes the Authorization header: the message we raise must not carry it.
    api = RecordingApi(fail_with=RuntimeError(f"401 Unauthorized (Authorization: Bearer {TOKEN})"))
    with pytest.raises(hub.HubPublishError) as info:
        hub.publish(exported, "acme/x", token=TOKEN, api=api)
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value) and "***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__

    # Through the CLI, with the token in HF_TOKEN: huggingface_hub.HfApi is replaced by a fake that fails likewise.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    import huggingface_hub

    class FakeHfApi(RecordingApi):
        def __init__(self, token=None):
            super().__init__(fail_with=RuntimeError(f"bad token {TOKEN}"))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    parser = _parser()
    args = parser.parse_args(["publish", str(exported), "--repo-id", "acme/x"])
    assert args.func(args) == 1
    captured = capsys.readouterr()
    assert "error:" in captured.err
    assert TOKEN not in captured.out + captured.err + caplog.text


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-hf")
    hub.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_export_and_publish_dry_run(checkpoint, tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    parser = _parser()
    args = parser.parse_args(["export", str(checkpoint), str(tmp_path / "out"), "--base-model", BASE,
                              "--bench-json", str(tmp_path / "bench.json"), "--license", "mit"])
    assert args.func(args) == 0
    assert "exported DFlash drafter" in capsys.readouterr().out
    assert ModelCard.load(tmp_path / "out" / "README.md").data.license == "mit"

    args = parser.parse_args(["publish", str(tmp_path / "out"), "--repo-id", "acme/x", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "model.safetensors" in out and "config.json" in out

    args = parser.parse_args(["export", str(tmp_path), str(tmp_path / "o2"), "--base-model", BASE])
    assert args.func(args) == 2
    assert "not a drafter checkpoint" in capsys.readouterr().err


def test_dflash_hf_cli_registers_the_hub_commands():
    from dflash_hf.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["publish", "some/folder", "--repo-id", "acme/x", "--dry-run"])
    assert callable(args.func) and args.dry_run
