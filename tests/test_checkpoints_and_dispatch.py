"""Checkpoint formats (z-lab's, ours, remote code without dflash_hf) and the zero-flag generate patch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from safetensors.torch import save_file
from transformers import AutoModel
from transformers.generation.utils import GenerationMixin

import dflash_hf
from dflash_hf import DFlashDraftModel
from dflash_hf.tools.hub import core_files


def zlab_config(num_layers: int = 2) -> dict:
    """A config.json in the exact shape of z-lab's published drafters (Qwen3 config + DFlash fields)."""
    return {
        "architectures": ["DFlashDraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": 8,
        "bos_token_id": None,
        "dflash_config": {"mask_token_id": VOCAB - 1, "target_layer_ids": [1, 2]},
        "dtype": "float32",
        "eos_token_id": None,
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 512,
        "max_window_layers": num_layers,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 2,
        "num_target_layers": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }


def zlab_tensors(num_layers: int = 2, scale: float = 0.1) -> dict:
    """Random weights under z-lab's tensor names for a hidden-32, 4-head (2 KV), 2-tap drafter."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (32, 64), "hidden_norm.weight": (32,), "norm.weight": (32,)}
    for i in range(num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (32, 32), p + "self_attn.k_proj.weight": (16, 32),
            p + "self_attn.v_proj.weight": (16, 32), p + "self_attn.o_proj.weight": (32, 32),
            p + "self_attn.q_norm.weight": (8,), p + "self_attn.k_norm.weight": (8,),
            p + "mlp.gate_proj.weight": (64, 32), p + "mlp.up_proj.weight": (64, 32),
            p + "mlp.down_proj.weight": (32, 64),
            p + "input_layernorm.weight": (32,), p + "post_attention_layernorm.weight": (32,),
        })
    return {name: torch.randn(shape, generator=g) * scale + (1.0 if len(shape) == 1 else 0.0)
            for name, shape in shapes.items()}


def assert_same_drafts(loaded: DFlashDraftModel, built: DFlashDraftModel) -> None:
    """A loaded drafter computes what a directly built one with the same weights computes.

    Weights equal is not enough: from_pretrained builds on the meta device, so state that is not a saved tensor
    (RoPE frequencies, say) must be recreated, or drafts silently degrade to noise.
    """
    g = torch.Generator().manual_seed(3)
    cfg = built.config
    embeds = torch.randn(1, cfg.block_size, cfg.hidden_size, generator=g, dtype=torch.float64)
    taps = torch.randn(1, 11, cfg.num_taps * cfg.target_hidden_size, generator=g, dtype=torch.float64)
    block_positions = torch.arange(11, 11 + cfg.block_size)[None]
    out_loaded = loaded(embeds, taps, block_positions, torch.arange(11)[None])
    out_built = built(embeds, taps, block_positions, torch.arange(11)[None])
    torch.testing.assert_close(out_loaded, out_built)


def test_zlab_checkpoint_loads_exactly_and_decodes_losslessly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(zlab_config()))
    tensors = zlab_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    drafter, info = DFlashDraftModel.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float64)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert drafter.config.target_layer_ids == [1, 2] and drafter.config.mask_token_id == VOCAB - 1
    assert drafter.config.block_size == 8 and drafter.config.num_target_layers == 4
    torch.testing.assert_close(drafter.state_dict()["layers.1.mlp.up_proj.weight"], tensors["layers.1.mlp.up_proj.weight"].double())
    built = DFlashDraftModel(drafter.config).double()
    built.load_state_dict({k: v.double() for k, v in tensors.items()})
    assert_same_drafts(drafter, built)
    target = make_target("qwen3")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(plain, target.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=drafter))


@pytest.mark.parametrize(
    "edit, field, tensor, shape",
    [
        ({"hidden_size": 48}, "hidden_size=48", "fc.weight", "[32, 64]"),
        ({"dflash_config": {"mask_token_id": VOCAB - 1, "target_layer_ids": [1]}}, "target_layer_ids",
         "fc.weight", "[32, 64]"),
        ({"target_hidden_size": 16}, "target_hidden_size=16", "fc.weight", "[32, 64]"),
        ({"intermediate_size": 96}, "intermediate_size=96", "layers.0.mlp.gate_proj.weight", "[64, 32]"),
        ({"num_key_value_heads": 4}, "num_key_value_heads=4", "layers.0.self_attn.k_proj.weight", "[16, 32]"),
    ],
)
def test_config_that_disagrees_with_its_weights_names_the_field_and_the_tensor(tmp_path, edit, field, tensor,
                                                                             shape):
    """An edited config.json is not a corrupt download: the error says which config field disagrees with which
    tensor of the checkpoint, and how to get out."""
    (tmp_path / "config.json").write_text(json.dumps({**zlab_config(), **edit}))
    save_file(zlab_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as raised:
        DFlashDraftModel.from_pretrained(tmp_path)
    message = str(raised.value)
    assert field in message and tensor in message and shape in message, message
    assert "config.json" in message
    assert "download" not in message and "corrupt" not in message


def test_save_pretrained_roundtrip_keeps_format(tmp_path):
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"mask_token_id": drafter.config.mask_token_id, "target_layer_ids": [2]}
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dflash.DFlashConfig",
        "AutoModel": "modeling_dflash.DFlashDraftModel",
    }
    for name in ("modeling_dflash.py", "configuration_dflash.py", "generation_dflash.py", "transformers_compat.py"):
        source = (tmp_path / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+dflash_hf", source, re.M)  # self-contained remote code
    assert not list(tmp_path.glob("*.bin"))
    reloaded = DFlashDraftModel.from_pretrained(tmp_path, dtype=torch.float64)
    for key, value in drafter.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    assert_same_drafts(reloaded, drafter)


def test_checkpoint_default_for_drafts_per_step(tmp_path, scripted):
    target = make_target("qwen3")
    drafter = make_drafter(target, block_size=6)
    assert drafter.num_speculative_tokens is None
    drafter.save_pretrained(tmp_path / "all")
    assert "num_speculative_tokens" not in json.loads((tmp_path / "all" / "config.json").read_text())

    drafter.config.num_speculative_tokens = 2
    drafter.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_speculative_tokens"] == 2
    reloaded = DFlashDraftModel.from_pretrained(tmp_path / "two", dtype=torch.float64)
    assert reloaded.num_speculative_tokens == 2
    prompt = torch.tensor([[3, 14, 15, 92, 6, 5]])
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    scripted(plain, [None] * 12)  # every draft right: acceptance is capped only by the drafts verified
    assert torch.equal(target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=reloaded), plain)
    assert reloaded.last_stats.acceptance_lengths[:3] == [3, 3, 3]  # 2 drafts + the target's token
    reloaded.num_speculative_tokens = None  # a user may still verify the whole block
    scripted(plain, [None] * 12)
    assert torch.equal(target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=reloaded), plain)
    assert reloaded.last_stats.acceptance_lengths[:1] == [6]

    config = json.loads((tmp_path / "two" / "config.json").read_text())
    (tmp_path / "two" / "config.json").write_text(json.dumps({**config, "num_speculative_tokens": 6}))
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be from 1 to block_size - 1 = 5"):
        DFlashDraftModel.from_pretrained(tmp_path / "two")


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dflash_hf" or name.startswith("dflash_hf."):
                raise ImportError("dflash_hf is blocked in this process")
    sys.meta_path.insert(0, Block())
    try:
        import dflash_hf
        raise SystemExit("dflash_hf was importable")
    except ImportError:
        pass
    from transformers import AutoModel, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    target = Qwen3ForCausalLM(Qwen3Config(**{config})).to(torch.float64).eval()
    target.load_state_dict(torch.load(sys.argv[2], weights_only=True))
    drafter = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64)
    assert type(drafter).__module__.startswith("transformers_modules"), type(drafter).__module__
    prompt = torch.tensor([[3, 14, 15, 92, 6, 5]])
    plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
    fast = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast), (plain, fast)
    assert drafter.last_stats.new_tokens == 20
    print("REMOTE_OK", drafter.last_stats.num_target_forwards)
    """
)


def test_saved_folder_runs_as_remote_code_without_dflash_hf(tmp_path):
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.save_pretrained(tmp_path / "drafter")
    torch.save(target.state_dict(), tmp_path / "target.pt")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings")
    config = {k: getattr(target.config, k) for k in keys}
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT.replace("{config}", repr(config)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "drafter"), str(tmp_path / "target.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout


def test_patch_is_idempotent_with_two_remote_code_drafters(tmp_path):
    import importlib

    importlib.reload(dflash_hf)
    dflash_hf.install_generate_patch()
    target = make_target("qwen3")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    for i in range(2):
        make_drafter(target, seed=i).save_pretrained(tmp_path / f"d{i}")
        (tmp_path / f"d{i}" / "NOTE.txt").write_text(str(i))  # distinct folders, distinct module copies
        remote = AutoModel.from_pretrained(tmp_path / f"d{i}", trust_remote_code=True, dtype=torch.float64)
        assert type(remote) is not DFlashDraftModel
        assert torch.equal(plain, target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=remote))
    wrapped = GenerationMixin._assisted_decoding
    assert getattr(wrapped.__wrapped__, "__wrapped__", None) is None  # wrapped once, never chained


def test_other_assistants_and_plain_generate_untouched():
    target = make_target("qwen3")
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    assistant = make_target("qwen3", seed=5)
    assert torch.equal(plain, target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant))
    assert torch.equal(plain, target.generate(prompt, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3))


def test_checkpoint_loaded_without_remote_code_is_refused(tmp_path):
    target = make_target("qwen3")
    make_drafter(target).save_pretrained(tmp_path)
    plain_qwen3 = AutoModel.from_pretrained(tmp_path, trust_remote_code=False)
    assert not getattr(plain_qwen3, "is_dflash_drafter", False)  # model_type qwen3 builds a Qwen3Model silently
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, assistant_model=plain_qwen3)


PORTABLE_FILES = tuple(p.name for p in core_files())  # everything in dflash_hf/core/ but its __init__
# What remote code may import: the libraries it runs on, and standard modules that neither reach the network nor
# start processes. Relative imports (its own files) are always fine.
ALLOWED_IMPORTS = {"__future__", "torch", "transformers", "contextlib", "dataclasses", "functools", "importlib",
                   "inspect", "math", "pathlib", "threading", "time", "typing"}
# (os, shutil, subprocess, socket and urllib cannot be imported at all, so their calls need no listing.)
FORBIDDEN_CALLS = {"open", "eval", "exec", "compile", "__import__", "write_text", "write_bytes", "mkdir", "touch"}


def test_save_pretrained_writes_exactly_the_core(tmp_path):
    # transformers copies the drafter's module and what it imports relatively: that must reach every core module
    make_drafter(make_target("qwen3")).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == sorted(PORTABLE_FILES)
    assert "__init__.py" not in PORTABLE_FILES and "modeling_dflash.py" in PORTABLE_FILES


def test_remote_code_only_models_and_generates(tmp_path):
    """The files a drafter carries for trust_remote_code: no network, no processes, no file writes."""
    import ast

    make_drafter(make_target("qwen3")).save_pretrained(tmp_path)
    for name in PORTABLE_FILES:
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                roots = set()
            assert roots <= ALLOWED_IMPORTS, f"{name} imports {roots - ALLOWED_IMPORTS}"
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                assert called not in FORBIDDEN_CALLS, f"{name}:{node.lineno} calls {called}"
