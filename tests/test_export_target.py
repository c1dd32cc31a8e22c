"""`dflash-hf export-target OUT` / `dflash_hf.default_target_folder()`: the default target as a plain folder."""

from __future__ import annotations

import json

import dflash_hf
from dflash_hf.cli import main
from dflash_hf.training.default_pair import converted_target_dir


def test_default_target_folder_is_a_plain_safetensors_folder():
    folder = dflash_hf.default_target_folder()
    assert folder == converted_target_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".gguf", ".bin", ".pt")) for name in names)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_export_target_copies_the_folder_and_refuses_a_full_one(tmp_path, capsys):
    out = tmp_path / "smollm2"
    assert main(["export-target", str(out)]) == 0
    assert f"vllm serve {out}" in capsys.readouterr().out
    source = dflash_hf.default_target_folder()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert main(["export-target", str(out)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
