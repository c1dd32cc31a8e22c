"""Hybrid targets (Qwen3-Next, Qwen3.5, Qwen3.5-MoE): Gated-DeltaNet state rolled back after every partial accept."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import SMALL_CHI_SQUARE_SAMPLES, chi_square_p_value, exact_pair_law

from dflash_hf import DFlashDraftModel
from dflash_hf.core.transformers_compat import stock_loop_refuses_stateful

HYBRID_VOCAB = 128
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


def hybrid_config(kind: str, vocab: int = HYBRID_VOCAB, hidden: int = 32):
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        layer_types=LAYER_TYPES, eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    if kind == "qwen3_next":
        return transformers.Qwen3NextConfig(**common, **moe, decoder_sparse_step=1)
    if kind == "qwen3_5":
        return transformers.Qwen3_5TextConfig(**common)
    if kind == "qwen3_5_moe":
        return transformers.Qwen3_5MoeTextConfig(**common, **moe)
    raise KeyError(kind)


HYBRID_CLASSES = {
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
}


def make_hybrid(kind: str, seed: int = 0, **config_kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, HYBRID_CLASSES[kind])(hybrid_config(kind, **config_kwargs))
    model.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = model.double().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture(params=sorted(HYBRID_CLASSES))
def hybrid(request) -> torch.nn.Module:
    return make_hybrid(request.param)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, HYBRID_VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt_len", [1, 6, 17])
def test_hybrid_greedy_lossless_with_untrained_drafter(hybrid, prompt_len):
    drafter = DFlashDraftModel.from_target(hybrid, num_hidden_layers=1, block_size=8).eval()
    ids = prompt(prompt_len, prompt_len)
    plain = hybrid.generate(ids, max_new_tokens=24, do_sample=False)
    fast = hybrid.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    stats = drafter.last_stats
    partial_steps = sum(1 for n in stats.acceptance_lengths if n < 8)
    # every partial accept rolled the states back, except a last step cut short by max_length (fewer drafts)
    assert partial_steps - 1 <= stats.num_rollback_forwards <= partial_steps and stats.num_rollback_forwards > 0


def test_hybrid_every_acceptance_count_as_scripted(hybrid, scripted):
    """Accept 0, 1, …, B-1 drafts and then all of them: output identical, acceptance lengths as scripted."""
    block = 8
    drafter = DFlashDraftModel.from_target(hybrid, num_hidden_layers=1, block_size=block).eval()
    ids = prompt(5, 21)
    plain = hybrid.generate(ids, max_new_tokens=60, do_sample=False)
    errors = [1, 2, 3, 4, 5, 6, 7, None, 4, None, 1]
    scripted(plain, errors, vocab=HYBRID_VOCAB)
    fast = hybrid.generate(ids, max_new_tokens=60, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    expected = [slot if slot is not None else block for slot in errors]
    stats = drafter.last_stats
    assert stats.acceptance_lengths[: len(errors)] == expected
    assert stats.new_tokens == 60
    partial_steps = sum(1 for n in stats.acceptance_lengths if n < block)
    assert partial_steps - 1 <= stats.num_rollback_forwards <= partial_steps


def test_hybrid_stock_assisted_loop_refused_with_a_fix_where_it_cannot_roll_back(hybrid):
    """transformers < 5.25's assisted loop cannot roll a hybrid's states back: refused, saying what to use. From
    5.25 it records them and can: then it runs, and gives plain generate's tokens."""
    drafter = DFlashDraftModel.from_target(hybrid, num_hidden_layers=1, block_size=4).eval()
    drafter.generation_loop = "transformers"
    ids = prompt(4, 0)
    if stock_loop_refuses_stateful():
        with pytest.raises(ValueError, match="generation_loop = 'dflash'"):
            hybrid.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=drafter)
        return
    plain = hybrid.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(hybrid.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=drafter), plain)


def test_hybrid_other_assistants_get_transformers_own_rule():
    """The stateful flag is only lifted for DFlash drafters, and only during the check: another assistant is refused
    where transformers refuses it (< 5.25) and runs where transformers runs it."""
    target = make_hybrid("qwen3_5")
    other = make_hybrid("qwen3_5", seed=1)
    if stock_loop_refuses_stateful():  # transformers < 5.25
        with pytest.raises(ValueError, match="stateful"):
            target.generate(prompt(4, 0), max_new_tokens=4, do_sample=False, assistant_model=other)
    else:
        target.generate(prompt(4, 0), max_new_tokens=4, do_sample=False, assistant_model=other)
    assert "_is_stateful" not in vars(target)
    assert getattr(type(target), "_is_stateful", False) == stock_loop_refuses_stateful()


def test_conditional_generation_wrapper_text_only():
    """Qwen3.5 Hub checkpoints load as …ForConditionalGeneration: taps, embedding and head come from inside it."""
    text = hybrid_config("qwen3_5").to_dict()
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    target = transformers.Qwen3_5ForConditionalGeneration(config).double().eval()
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = None
    drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=6).eval()
    assert drafter.fc.in_features == len(drafter.config.target_layer_ids) * 32
    ids = prompt(7, 3)
    plain = target.generate(ids, max_new_tokens=20, do_sample=False)
    fast = target.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("mode", ["strict", "ratio"])
def test_hybrid_sampling_matches_plain_sampling_distribution(scripted, mode):
    """Joint law of generated tokens 2 and 3 (one verify block, rollbacks included) vs the exact law."""
    target = make_hybrid("qwen3_5", seed=3, vocab=6)
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)  # sharpen, so that drafts are accepted as well as rejected
    drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4).double()
    drafter.sampling_mode = mode
    start = torch.tensor([[1, 4, 2]])
    temperature, top_k = 0.8, 4
    expected = exact_pair_law(target, start, temperature, top_k)
    greedy = target.generate(start, max_new_tokens=8, do_sample=False)
    script = scripted(greedy, [None] * 100_000, vocab=6)
    counts = torch.zeros(6, 6)
    torch.manual_seed(99)
    accepted = rollbacks = 0
    for _ in range(SMALL_CHI_SQUARE_SAMPLES):
        script.step = 0
        out = target.generate(start, max_new_tokens=3, do_sample=True, temperature=temperature, top_k=top_k,
                              assistant_model=drafter)
        counts[out[0, 4], out[0, 5]] += 1
        accepted += drafter.last_stats.acceptance_lengths[0] - 1
        rollbacks += drafter.last_stats.num_rollback_forwards
    assert 0 < accepted < SMALL_CHI_SQUARE_SAMPLES * 2 and rollbacks > 0
    assert chi_square_p_value(counts, expected) > 1e-3, (counts, expected)


def test_batched_generation_on_a_hybrid_target_is_refused_clearly():
    target = make_hybrid("qwen3_5")
    drafter = DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=4).double()
    ids = torch.randint(0, HYBRID_VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="linear-attention"):
        target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, assistant_model=drafter)


def test_rollback_cost_benchmark_runs():
    """benchmarks/rollback_cost.py (the README's rollback numbers) runs and finds rollbacks on the hybrid only."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "rollback_cost.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "24", "--repeats", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    twin = re.search(r"attention-only twin.*\((\d+) re-runs", result.stdout)
    hybrid = re.search(r"hybrid \(qwen3_5\).*\((\d+) re-runs", result.stdout)
    assert twin and int(twin.group(1)) == 0
    assert hybrid and int(hybrid.group(1)) > 0
