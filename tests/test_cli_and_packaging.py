"""The dflash-hf command's argument checks and error messages, and what the package writes and installs.

Every argument check must fire before a model loads; model-level checks (a drafter the target cannot take) must
print one ``dflash-hf: error:`` line with exit status 2. Tiny models stand in for real ones wherever the point is
a message, not a generation.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COMMON, make_drafter, make_target
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

import dflash_hf.cli as cli
import dflash_hf.tools.bench as bench
import dflash_hf.training.options as options
from dflash_hf.fileio import atomic_write_text, make_shareable, staging_dir
from dflash_hf.tools import hub, model_card
from dflash_hf.training.default_pair import converted_target_dir, default_drafter_dir

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hub_upload" / "SmolLM2-135M-Instruct-DFlash"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tiny_llama(num_layers: int = 4, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(head_dim=8, **{**COMMON, "num_hidden_layers": num_layers, "hidden_size": hidden})
    return LlamaForCausalLM(config).eval()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory) -> Path:
    """A 4-layer hidden-32 Llama target with the default pair's tokenizer files (so that the CLI can load it)."""
    folder = tmp_path_factory.mktemp("target") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    for source in converted_target_dir().iterdir():
        if source.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(source, folder / source.name)
    return folder


def drafter_dir(tmp_path: Path, target: torch.nn.Module, name: str = "drafter") -> Path:
    folder = tmp_path / name
    make_drafter(target).save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the command gets as far as loading a model (any transformers model, drafters included)."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} was loaded before the arguments were checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def usage_error(argv: list[str], capsys) -> str:
    """Run the command, expect argparse's usage error (exit 2), return what it printed."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def command_error(argv: list[str], capsys) -> str:
    """Run the command, expect a one-line ``dflash-hf: error:`` and exit status 2, return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("dflash-hf: error: "), err
    return err[-1]


# ---------------------------------------------------------------------------------------------------------------
# 6. bench without matplotlib
# ---------------------------------------------------------------------------------------------------------------
def test_default_pair_extra_brings_matplotlib():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("matplotlib") for req in project["optional-dependencies"]["default-pair"])
    torch_req = next(req for req in project["dependencies"] if req.startswith("torch"))
    assert "==" not in torch_req and "<" not in torch_req  # an open range: users bring their own CUDA build


CANNED_RESULTS = {
    "methods": {"plain": {"tokens_per_s": 10.0, "speedup": 1.0, "mean_acceptance_length": None},
                "dflash": {"tokens_per_s": 20.0, "speedup": 2.0, "mean_acceptance_length": 2.5}},
    "step_cost": None, "lossless": True, "mismatched_prompts": {}, "num_prompts": 2, "max_new_tokens": 4,
}
CANNED_BATCH_RESULTS = {
    "batches": [{"batch_size": 2, "num_batches": 1, "plain_tokens_per_s": 10.0, "dflash_tokens_per_s": 15.0,
                 "speedup": 1.5, "mean_acceptance_length": 2.0, "mismatched_rows": 0}],
    "lossless": True, "num_prompts": 2, "max_new_tokens": 4, "device": "cpu", "dtype": "float32",
}


@pytest.mark.parametrize("batched", [False, True], ids=["methods", "batches"])
def test_bench_without_matplotlib_says_so_first_and_writes_the_json(batched, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    printed_before_loading = []

    def load_pair(*args):
        printed_before_loading.append(capsys.readouterr().err)
        return object(), object(), object()

    monkeypatch.setattr(cli, "_load_pair", load_pair)
    monkeypatch.setattr(cli, "_set_drafts_per_step", lambda *a: None)  # the stand-in models have no shapes to measure
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: json.loads(json.dumps(CANNED_RESULTS)))
    monkeypatch.setattr(bench, "run_batch_bench", lambda *a, **k: json.loads(json.dumps(CANNED_BATCH_RESULTS)))
    argv = ["bench", "--num-prompts", "2", "--max-new-tokens", "4", "--out", str(tmp_path)]
    assert cli.main(argv + (["--batch-size", "2"] if batched else [])) == 0
    name = "bench_batch" if batched else "bench"
    assert "matplotlib is not installed" in printed_before_loading[0]
    assert "pip install 'dflash-hf[bench]'" in printed_before_loading[0]
    assert json.loads((tmp_path / f"{name}.json").read_text())["lossless"] is True
    assert not (tmp_path / f"{name}.png").exists()
    out = capsys.readouterr().out
    assert f"skipped {name}.png: matplotlib is not installed (pip install 'dflash-hf[bench]' adds it)" in out


def test_write_outputs_without_matplotlib_returns_no_png(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    json_path, png_path = bench.write_outputs(dict(CANNED_RESULTS), tmp_path)
    assert json_path.is_file() and png_path is None and not (tmp_path / "bench.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# 8, 9. Arguments are checked before any model loads
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["bench", "--prompts", "/nonexistent.jsonl"], "argument --prompts: /nonexistent.jsonl does not exist"),
    (["bench", "--num-prompts", "0"], "argument --num-prompts: must be at least 1, got 0"),
    (["bench", "--num-prompts", "-3"], "argument --num-prompts: must be at least 1, got -3"),
    (["bench", "--batch-size", "1", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["bench", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["bench", "--num-speculative-tokens", "0"], "argument --num-speculative-tokens: must be at least 1, got 0"),
    (["bench", "--sampling-temperature", "0"], "argument --sampling-temperature: must be a finite number > 0"),
    (["bench", "--num-prompts", "two"], "argument --num-prompts: expected an integer, got 'two'"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["demo", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be at least 1, got -5"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "argument --temperature: must be a finite number >= 0"),
    (["demo", "--target", "org/model"], "--drafter is required with --target"),
    (["demo", "--drafter", "/nonexistent"], "argument --drafter: the folder /nonexistent does not exist"),
    (["demo", "--drafter", "runs/demo/drafter"], "argument --drafter: the folder runs/demo/drafter does not exist"),
    (["generate", "--prompt", "hi", "--target", "./missing", "--drafter", "org/d"], "the folder ./missing does not"),
])
def test_bad_arguments_are_usage_errors_before_loading(argv, message, capsys, no_model_loads):
    assert message in usage_error(argv, capsys)


def test_bench_out_must_not_be_a_file(tmp_path, capsys, no_model_loads):
    (tmp_path / "results").write_text("")
    assert "is a file; give a folder" in usage_error(["bench", "--out", str(tmp_path / "results")], capsys)


def test_bench_batch_larger_than_the_prompts_is_refused_before_loading(capsys, no_model_loads):
    line = command_error(["bench", "--batch-size", "4", "--num-prompts", "2"], capsys)
    assert line == ("dflash-hf: error: --batch-size 4 needs at least that many prompts; 2 were loaded (raise "
                    "--num-prompts or give a longer --prompts file).")


TRAIN_BAD = [
    (["--block-size", "1"], "argument --block-size: must be from 2 to 128, got 1"),
    (["--block-size", "129"], "argument --block-size: must be from 2 to 128, got 129"),
    (["--num-layers", "0"], "argument --num-layers: must be at least 1, got 0"),
    (["--num-taps", "0"], "argument --num-taps: must be at least 1, got 0"),
    (["--steps", "-1"], "argument --steps: must be at least 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--gen-batch-size", "0"], "argument --gen-batch-size: must be at least 1, got 0"),
    (["--num-anchors", "0"], "argument --num-anchors: must be at least 1, got 0"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--save-every", "0"], "argument --save-every: must be at least 1, got 0"),
    (["--num-prompts", "0"], "argument --num-prompts: must be at least 1, got 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["--temperature", "-0.5"], "argument --temperature: must be a finite number >= 0, got -0.5"),
    (["--mask-token-id", "-1"], "argument --mask-token-id: must be at least 0, got -1"),
    (["--prompts", "data/missing.jsonl"], "argument --prompts: data/missing.jsonl does not exist"),
    (["--init-from", "/no/such/drafter"], "argument --init-from: the folder /no/such/drafter does not exist"),
    (["--openai-model", "m"], "--openai-model names the model of an --openai-base-url server"),
    (["--gen-drafter", "org/d", "--openai-base-url", "http://x"], "drop one of them"),
    (["--init-from", "org/d", "--init-from-target"], "choose one"),
]


@pytest.mark.parametrize("extra, message", TRAIN_BAD, ids=[" ".join(e) for e, _ in TRAIN_BAD])
def test_every_train_option_is_checked_before_stage_1(extra, message, tmp_path, capsys, no_model_loads):
    assert message in usage_error(["train", "--out", str(tmp_path / "run"), *extra], capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["mask token", "init-from", "gen-drafter"])
def test_train_options_the_target_cannot_take_fail_before_stage_1(case, tiny_target_dir, tmp_path, capsys):
    mismatched = drafter_dir(tmp_path, tiny_llama(num_layers=8))  # taps layers the 4-layer target lacks
    extra, message = {
        "mask token": (["--mask-token-id", "5000"], "mask_token_id 5000 is outside the vocabulary"),
        "init-from": (["--init-from", str(mismatched)], "the target has only 4 decoder layers"),
        "gen-drafter": (["--gen-drafter", str(mismatched)], "the target has only 4 decoder layers"),
    }[case]
    run = tmp_path / "run"
    argv = ["train", "--target", str(tiny_target_dir), "--out", str(run), "--num-layers", "1", "--num-taps", "1"]
    line = command_error(argv + extra, capsys)
    assert message in line
    assert not run.exists()  # nothing written: not even the command, let alone prompts or responses


def test_the_early_drafter_check_leaves_the_random_state_alone():
    """The drafter built after stage 1 draws the initial weights it drew before the check existed."""
    from dflash_hf.training.pipeline import TrainSpec, early_drafters

    target = make_target("llama")
    spec = TrainSpec(out="unused", num_layers=1, block_size=8, num_taps=1)
    torch.manual_seed(123)
    expected = torch.random.get_rng_state()
    assert early_drafters(spec, target) == (None, None)
    assert torch.equal(torch.random.get_rng_state(), expected)


# ---------------------------------------------------------------------------------------------------------------
# 10, 11. Pair mismatches and wrong checkpoints: one line, exit 2, before any generation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, hidden, message", [
    (8, 32, "Drafter taps target layers"),  # taps beyond the target's 4 layers
    (4, 64, "Drafter fc expects"),  # built for a target twice as wide
], ids=["taps", "fc width"])
def test_pair_mismatch_is_reported_right_after_loading(layers, hidden, message, tiny_target_dir, tmp_path, capsys,
                                                       monkeypatch):
    drafter = drafter_dir(tmp_path, tiny_llama(layers, hidden))
    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda *a, **k: pytest.fail("generation started"))
    line = command_error(["demo", "--target", str(tiny_target_dir), "--drafter", str(drafter)], capsys)
    assert message in line


def test_plain_model_given_as_drafter_is_not_a_dflash_checkpoint(tiny_target_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_target", lambda *a: pytest.fail("the target loaded before the drafter check"))
    line = command_error(["demo", "--drafter", str(tiny_target_dir)], capsys)
    assert line.startswith(f"dflash-hf: error: --drafter {tiny_target_dir} is not a DFlash checkpoint: its "
                           "config.json (model_type 'llama', architectures ['LlamaForCausalLM']) has no dflash_config")


def test_drafter_given_as_target_is_refused(capsys):
    line = command_error(["demo", "--target", str(SHIPPED), "--drafter", str(SHIPPED)], capsys)
    assert f"--target {SHIPPED} is a DFlash drafter, not a target model" in line


def test_a_drafter_folder_without_weights_is_one_line(tiny_target_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(drafter_dir(tmp_path, tiny_llama()) / "config.json", broken / "config.json")
    command_error(["demo", "--target", str(tiny_target_dir), "--drafter", str(broken)], capsys)


# ---------------------------------------------------------------------------------------------------------------
# 13. publish uploads only what export writes
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("export")
    target = make_target("qwen3")
    make_drafter(target).save_pretrained(work / "ckpt")
    return hub.export_drafter(work / "ckpt", work / "out", base_model=BASE, training_summary={"steps": 3})


def test_publish_skips_bytecode_caches_and_foreign_files(exported, tmp_path, capsys):
    written = sorted(p.name for p in exported.iterdir())
    folder = shutil.copytree(exported, tmp_path / "installed")
    assert compileall.compile_dir(str(folder), quiet=1)  # what pip leaves next to installed .py files
    assert any((folder / "__pycache__").glob("*.pyc"))
    (folder / "notes.txt").write_text("not part of the export")
    assert hub.publish(folder, "acme/x", dry_run=True) == written
    assert hub.hub_folder_problems(folder) == []
    assert cli.main(["publish", str(folder), "--repo-id", "acme/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would upload {len(written)} files" in out and ".pyc" not in out and "notes.txt" not in out


def test_publish_of_the_installed_default_drafter_lists_no_bytecode(tmp_path):
    folder = shutil.copytree(default_drafter_dir(), tmp_path / "default_drafter", ignore=shutil.ignore_patterns("_*"))
    compileall.compile_dir(str(folder), quiet=1)
    files = hub.publish(folder, "acme/x", dry_run=True)
    assert files == sorted(p.name for p in SHIPPED.iterdir() if p.is_file())
    assert not any(name.endswith(".pyc") for name in files)


# ---------------------------------------------------------------------------------------------------------------
# 14. Atomic writes get the permissions a plain write would
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(umask, file_mode, dir_mode, tmp_path):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        folder = staging_dir(tmp_path, prefix=".stage-")
        private = folder / "weights.safetensors"
        private.write_bytes(b"x")
        private.chmod(0o600)  # as safetensors writes its files
        make_shareable(folder)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(folder) == dir_mode and mode(private) == file_mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".a.json")] == []  # no temporary left


def test_exported_folder_bench_json_and_features_are_shareable(exported, tmp_path, umask_022):
    out = hub.export_drafter(exported, tmp_path / "export", base_model=BASE)
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    json_path, png_path = bench.write_outputs(dict(CANNED_RESULTS, acceptance_histogram={}, block_size=8,
                                                   methods=CANNED_RESULTS["methods"], target="t", drafter="d",
                                                   device="cpu", dtype="float32"), tmp_path / "bench")
    assert mode(json_path) == 0o644 and (png_path is None or mode(png_path) == 0o644)
    from dflash_hf.training.trainer import _atomic_save

    _atomic_save({"x": torch.zeros(2)}, tmp_path / "features-00000.safetensors", {"prompt_lens": "[]"})
    assert mode(tmp_path / "features-00000.safetensors") == 0o644


def test_training_checkpoints_are_shareable(tmp_path, umask_022):
    from accelerate import Accelerator

    from dflash_hf.training.trainer import TrainConfig, _save_checkpoint

    _save_checkpoint(Accelerator(cpu=not torch.cuda.is_available()), tmp_path, 1, TrainConfig())
    checkpoint = tmp_path / "checkpoint-1"
    assert mode(checkpoint) == 0o755
    assert all(mode(p) == 0o644 for p in checkpoint.rglob("*") if p.is_file())


def test_converted_default_target_cache_is_shareable(tmp_path, monkeypatch, umask_022):
    """The conversion itself (de-quantising the GGUF, 15-40 s) is replaced by a tiny model; the writing is real."""
    import transformers

    import dflash_hf.training.default_pair as default_pair

    class Tokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    monkeypatch.setenv("DFLASH_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_pair, "_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())
    folder = default_pair.converted_target_dir()
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert mode(folder) == 0o755
    assert {p.name: mode(p) for p in folder.iterdir()} == {p.name: 0o644 for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------------------------
# 15. --help, --version, help text
# ---------------------------------------------------------------------------------------------------------------
def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_and_version_import_neither_torch_nor_transformers():
    # every subcommand the parser has, so a new one cannot pull torch into --help unnoticed
    out = _python(
        "import argparse, contextlib, io, sys\n"
        "from dflash_hf.cli import build_parser, main\n"
        "sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))\n"
        "for argv in (['--help'], ['--version'], *([c, '--help'] for c in sub.choices)):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(len(sub.choices), sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    count, imported = out.strip().split(" ", 1)
    assert int(count) >= 9 and imported == "[]", out


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    out = _python("from dflash_hf.cli import main; main(['--version'])")
    assert out.strip() == f"dflash-hf {version('dflash-hf')}"


def test_importing_dflash_hf_installs_the_patch_when_transformers_loads():
    out = _python(
        "import sys, dflash_hf\n"
        "print('torch' in sys.modules)\n"
        "from transformers.generation.utils import GenerationMixin\n"
        "print(getattr(GenerationMixin, '_dflash_patch_installed', False))\n"
    )
    assert out.split() == ["False", "True"]


@pytest.mark.parametrize("statement", [
    "from dflash_hf import DFlashDraftModel",
    "from dflash_hf import DFlashCandidateGenerator",
    "import dflash_hf.core.patch_dflash",
    "from transformers.generation.utils import GenerationMixin; import dflash_hf",
    "import dflash_hf; from transformers import LlamaForCausalLM",
    "import dflash_hf; from transformers import AutoModelForCausalLM as M, LlamaConfig as C; "
    "M.from_config(C(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2))",
])
def test_every_way_of_importing_dflash_hf_installs_the_patch(statement):
    """However the package is reached, generate is patched by the time a model can call it."""
    out = _python(
        f"{statement}\n"
        "from transformers.generation.utils import GenerationMixin\n"
        "print(getattr(GenerationMixin, '_dflash_patch_installed', False))\n"
    )
    assert out.strip() == "True"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_has_no_markup_and_every_option_is_explained():
    parser = cli.build_parser()
    assert "``" not in parser.format_help()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert "``" not in text and "`" not in text, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"
    train_help = _subparsers(parser)["train"].format_help()
    for shown in ("(default: 1500)", "(default: 6e-4)", "(default: 8)", "(default: 1000)"):
        assert shown.replace("6e-4", "0.0006") in train_help, shown


def test_cli_block_size_bound_is_the_decode_loop_s():
    from dflash_hf.core.pair_dflash import MAX_BLOCK_SIZE

    assert options.MAX_BLOCK_SIZE == MAX_BLOCK_SIZE


# ---------------------------------------------------------------------------------------------------------------
# 16. chat_stream's --target/--drafter; a re-export keeps training.json
# ---------------------------------------------------------------------------------------------------------------
def test_chat_stream_takes_target_and_drafter():
    result = subprocess.run(
        [sys.executable, "examples/chat_stream.py", "--target", str(converted_target_dir()), "--drafter",
         str(default_drafter_dir()), "--max-new-tokens", "6"],
        cwd=ROOT, env=OFFLINE_ENV, input="Hello!\n", capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[acceptance length") == 1


def test_reexporting_the_shipped_folder_keeps_its_training_json(tmp_path):
    out = hub.export_drafter(SHIPPED, tmp_path / "again", base_model=BASE)
    assert (out / "training.json").read_bytes() == (SHIPPED / "training.json").read_bytes()
    card = (out / "README.md").read_text()
    recipe = json.loads((SHIPPED / "training.json").read_text())
    assert all(f"| {key} | {value} |" in card for key, value in model_card._recipe_rows(recipe))


def test_an_explicit_recipe_still_wins_over_the_checkpoint_s(exported, tmp_path):
    out = hub.export_drafter(exported, tmp_path / "again", base_model=BASE, training_summary={"steps": 99})
    assert json.loads((out / "training.json").read_text()) == {"steps": 99}
    kept = hub.export_drafter(exported, tmp_path / "kept", base_model=BASE)
    assert json.loads((kept / "training.json").read_text()) == {"steps": 3}
    assert "| steps | 3 |" in (kept / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# 17. Nothing in the repository shadows a real package when Python runs from its root (transformers >= 5.25
#     imports Hugging Face's `kernels` for every model; our Triton code lives under kernels/ too)
# ---------------------------------------------------------------------------------------------------------------
_WHERE_KERNELS_RESOLVES = """
import importlib.metadata, importlib.util, json
spec = importlib.util.find_spec("kernels")
try:
    dist = importlib.metadata.distribution("kernels")
    installed = str(dist.locate_file(""))
except importlib.metadata.PackageNotFoundError:
    installed = None
print(json.dumps({"origin": spec and spec.origin, "locations": spec and list(spec.submodule_search_locations or []),
                  "installed_at": installed}))
"""


def test_import_kernels_from_the_repository_root_is_never_ours():
    """From the root, in a fresh interpreter (cwd first on sys.path): `kernels` is Hugging Face's package where it is
    installed; where it is not, nothing of ours answers (at most the empty namespace of the kernels/ folder, which
    holds no module: our code is the dflash_hf_kernels package inside it)."""
    where = json.loads(_python(_WHERE_KERNELS_RESOLVES))
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not list((ROOT / "kernels").glob("*.py")), "a module directly under kernels/ would import as kernels.<name>"
    if where["installed_at"] is not None:
        assert where["origin"] is not None and not Path(where["origin"]).resolve().is_relative_to(ROOT / "kernels")
        assert Path(where["origin"]).resolve().is_relative_to(Path(where["installed_at"]).resolve()), where
    else:
        assert where["origin"] is None, where  # no regular package of that name anywhere, ours included


def test_the_default_pair_loads_and_decodes_from_the_repository_root():
    out = _python("import dflash_hf, dflash_hf.kernels as k, torch\n"
                  "target, tokenizer, drafter = dflash_hf.load_default_pair()\n"
                  "ids = torch.tensor([tokenizer.encode('Hello')])\n"
                  "fast = target.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=drafter)\n"
                  "plain = target.generate(ids, max_new_tokens=6, do_sample=False)\n"
                  "print(k.__name__, torch.equal(fast, plain))\n")
    assert out.split()[-2:] == ["dflash_hf.kernels", "True"]
