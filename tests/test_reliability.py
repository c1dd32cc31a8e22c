"""Bad checkpoints, impossible lengths, faults and long runs: clear errors, nothing left behind, bounded memory."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dflash_hf import DFlashConfig, DFlashDraftModel


@pytest.fixture
def saved(tmp_path):
    target = make_target("qwen3")
    make_drafter(target).save_pretrained(tmp_path)
    return tmp_path, target


def test_missing_config(saved):
    folder, _ = saved
    (folder / "config.json").unlink()
    with pytest.raises(OSError, match="config.json"):
        DFlashDraftModel.from_pretrained(folder)


def test_truncated_safetensors(saved):
    folder, _ = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError), match="(?i)incomplete or corrupt|corrupt|truncat|invalid"):
        DFlashDraftModel.from_pretrained(folder)


def test_missing_tensor(saved):
    folder, _ = saved
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("layers.0.mlp.up_proj.weight")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys: \\['layers.0.mlp.up_proj.weight'\\]"):
        DFlashDraftModel.from_pretrained(folder)


def test_extra_tensor(saved):
    folder, _ = saved
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["layers.7.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected keys"):
        DFlashDraftModel.from_pretrained(folder)


def test_pickle_weights_refused(saved):
    folder, _ = saved
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        DFlashDraftModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors only"):
        DFlashDraftModel.from_pretrained(folder, use_safetensors=False)


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(
    st.sampled_from(["block_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "dflash_config", "layer_types", "rope_theta", "sliding_window", "vocab_size", "head_dim",
                     "num_target_layers", "rope_scaling"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True), st.text(max_size=5),
              st.lists(st.integers(-3, 40), max_size=4),
              st.dictionaries(st.sampled_from(["mask_token_id", "target_layer_ids", "type", "factor"]),
                              st.one_of(st.integers(-3, 99), st.lists(st.integers(-3, 9), max_size=3), st.text(max_size=3)))),
    max_size=4,
))
def test_config_parsing_fuzz(overrides):
    """Any config.json content either parses or raises a ValueError — never a crash deep inside."""
    base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=1, dflash_config={"mask_token_id": 3, "target_layer_ids": [1]})
    base.update(overrides)
    try:
        config = DFlashConfig(**base)
    except ValueError:
        return
    with torch.device("meta"):  # shapes only: a parsed config may legally ask for a huge model
        if config.target_layer_ids is None:  # the one thing a config may leave open; the model refuses it
            with pytest.raises(ValueError, match="target layers to tap are unknown"):
                DFlashDraftModel(config)
        else:
            DFlashDraftModel(config)  # any other config that parses builds a model


def test_config_without_taps_parses_but_does_not_load(tmp_path):
    """transformers builds an argument-free config to diff against; only a model needs the taps."""
    assert DFlashConfig().target_layer_ids is None
    config = DFlashConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, dflash_config={"mask_token_id": 3, "target_layer_ids": [1]})
    DFlashDraftModel(config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["dflash_config"].pop("target_layer_ids")
    raw.pop("num_target_layers", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="Add one of them to config.json"):
        DFlashDraftModel.from_pretrained(tmp_path)


def test_prompt_longer_than_context():
    target = make_target("qwen3")
    prompt = torch.randint(0, VOCAB, (1, 520))
    with pytest.raises(ValueError, match="context"):
        target.generate(prompt, max_new_tokens=4, assistant_model=make_drafter(target))


def test_max_new_tokens_overflowing_context():
    target = make_target("qwen3")
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=600, assistant_model=make_drafter(target))


def test_long_generation_keeps_draft_cache_bounded_and_memory_flat():
    """4k+ new tokens on a tiny target: the draft cache holds committed context only (one entry per position)."""
    target = make_target("qwen3", dtype=torch.float32)
    target.config.max_position_embeddings = 8192
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    target.generate(prompt, max_new_tokens=256, min_new_tokens=256, assistant_model=drafter)
    short_rss = resident_bytes()
    out = target.generate(prompt, max_new_tokens=4200, min_new_tokens=4200, assistant_model=drafter)
    long_rss = resident_bytes()
    stats = drafter.last_stats
    assert out.shape[1] == 8 + 4200 and stats.new_tokens == 4200
    assert sum(stats.acceptance_lengths) == 4200 - 1
    per_position = 2 * drafter.config.num_key_value_heads * drafter.config.head_dim * 4 + 8  # K+V fp32 + position
    assert stats.draft_cache_bytes <= (8 + 4200) * per_position  # never the rejected block entries
    assert long_rss < short_rss + 64 * 2**20, (short_rss, long_rss)  # flat: no growth by rejected slots
    print(f"RSS after 256 tokens {short_rss / 2**20:.1f} MiB, after 4200 tokens {long_rss / 2**20:.1f} MiB; "
          f"draft cache {stats.draft_cache_bytes / 2**10:.1f} KiB")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
