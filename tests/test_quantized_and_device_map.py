"""Targets as users load them for big models: bitsandbytes 4-bit / 8-bit, and spread with a device_map."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen3Config, Qwen3ForCausalLM

from dflash_hf import DFlashDraftModel

VOCAB = 96


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory) -> str:
    """A tiny fp32 Qwen3 checkpoint with a sharpened head (few near-ties between the top logits)."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=None,
                         pad_token_id=None, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    return str(folder)


def load(folder: str, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def assert_lossless_with_scripted_and_random_drafts(target, scripted) -> None:
    drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=6).eval()
    prompts = [torch.randint(0, VOCAB, (1, 4 + s), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    plains = [target.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    for prompt, plain in zip(prompts, plains):  # untrained drafter: drafts rejected, the bonus token decides
        assert torch.equal(plain, target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter))
    for prompt, plain in zip(prompts, plains):  # scripted: whole blocks accepted, several tokens per verify
        scripted(plain, [None, 3, None, 1, 5, None], vocab=VOCAB)
        assert torch.equal(plain, target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter))
        assert drafter.last_stats.acceptance_lengths[:4] == [6, 3, 6, 1]


@pytest.mark.parametrize("quantization", [
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    BitsAndBytesConfig(load_in_8bit=True),
], ids=["nf4", "int8"])
def test_bitsandbytes_target_lossless_against_same_quantized_model(saved_target, quantization, scripted):
    target = load(saved_target, quantization_config=quantization)
    quantized = type(target.model.layers[0].mlp.up_proj).__name__
    assert quantized in ("Linear4bit", "Linear8bitLt"), quantized
    assert_lossless_with_scripted_and_random_drafts(target, scripted)


def test_device_map_with_offloaded_layers(saved_target, tmp_path, scripted):
    """Layers 2-3 offloaded to disk: accelerate hooks move their weights in for each forward; the taps (forward
    hooks on those layers), shared embedding and head still meet the drafter on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    target = load(saved_target, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert hasattr(target.model.layers[3], "_hf_hook")  # really dispatched by accelerate
    assert_lossless_with_scripted_and_random_drafts(target, scripted)
