"""Clear errors for what cannot work, and sampling that is distributed exactly as plain sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_CHI_SQUARE_SAMPLES, VOCAB, chi_square_p_value, exact_pair_law, make_drafter, make_target
from transformers import MistralConfig, MistralForCausalLM

from dflash_hf import DFlashConfig, DFlashDraftModel


@pytest.fixture(scope="module")
def target():
    return make_target("qwen3")


def prompt(n=5, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_num_return_sequences_refused(target):
    with pytest.raises(ValueError, match="num_return_sequences"):
        target.generate(prompt(), max_new_tokens=4, do_sample=True, num_return_sequences=2,
                        assistant_model=make_drafter(target))


def test_beam_search_refused(target):
    with pytest.raises(ValueError, match="beam search"):
        target.generate(prompt(), max_new_tokens=4, num_beams=2, assistant_model=make_drafter(target))


def test_tap_beyond_target_layers(target):
    drafter = DFlashDraftModel.from_target(make_target("qwen3"), target_layer_ids=[1, 3]).double()
    drafter.config.target_layer_ids = [1, 7]
    with pytest.raises(ValueError, match=r"only 4 decoder layers .*\[7\]"):
        target.generate(prompt(), max_new_tokens=4, assistant_model=drafter)


def test_hidden_size_mismatch(target):
    config = DFlashConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, target_hidden_size=32,
                          dflash_config={"mask_token_id": 3, "target_layer_ids": [2]})
    drafter = DFlashDraftModel(config).double()
    with pytest.raises(ValueError, match="hidden_size=48 differs from the target embedding width 32"):
        target.generate(prompt(), max_new_tokens=4, assistant_model=drafter)


def test_fc_width_mismatch(target):
    drafter = make_drafter(target)
    drafter.fc = torch.nn.Linear(48, 32, bias=False).double()
    with pytest.raises(ValueError, match="fc expects 48 input features"):
        target.generate(prompt(), max_new_tokens=4, assistant_model=drafter)


def test_mask_token_outside_vocabulary(target):
    drafter = make_drafter(target)
    drafter.config.mask_token_id = VOCAB + 10
    with pytest.raises(ValueError, match="not a row of the target's embedding table"):
        target.generate(prompt(), max_new_tokens=4, assistant_model=drafter)


def test_unsupported_target_family():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    other = MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match="does not support target model_type 'mistral'"):
        DFlashDraftModel.from_target(other)


@pytest.mark.parametrize("bad, message", [
    ({"block_size": 1}, "block_size must be >= 2"),
    ({"block_size": "16"}, "block_size must be an integer"),
    ({"dflash_config": {"mask_token_id": 10, "target_layer_ids": []}}, "non-empty list"),
    ({"dflash_config": {"mask_token_id": 500, "target_layer_ids": [1]}}, "outside the vocabulary"),
    ({"num_target_layers": 4, "dflash_config": {"mask_token_id": 1, "target_layer_ids": [4]}}, "beyond num_target_layers"),
    ({"layer_types": ["sliding_attention"]}, "sliding_window is not set"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_config_errors(bad, message):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=1, dflash_config={"mask_token_id": 3, "target_layer_ids": [1]})
    base.update(bad)
    with pytest.raises(ValueError, match=message):
        DFlashConfig(**base)


def test_empty_prompt_refused(target):
    with pytest.raises(ValueError):
        target.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4, assistant_model=make_drafter(target))


# ---------------------------------------------------------------------------------------------------------------
# Sampling: a goodness-of-fit test against the exact distribution of plain sampling
# ---------------------------------------------------------------------------------------------------------------
SMALL_VOCAB = 6


def small_target():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    config = Qwen3Config(vocab_size=SMALL_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, eos_token_id=None,
                         pad_token_id=None, bos_token_id=None)
    model = Qwen3ForCausalLM(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharpen: the drafter's argmax guesses are then often accepted
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("mode", ["strict", "ratio"])
def test_sampling_matches_plain_sampling_distribution(scripted, mode):
    """Joint law of generated tokens 2 and 3 (both decided in the first verify block) vs the exact law."""
    model = small_target()
    drafter = DFlashDraftModel.from_target(model, num_hidden_layers=1, block_size=4).double()
    drafter.sampling_mode = mode
    start = torch.tensor([[1, 4, 2]])
    temperature, top_k = 0.8, 4
    expected = exact_pair_law(model, start, temperature, top_k)
    # drafts: the greedy continuation, so that acceptance (and rejection) both happen often
    greedy = model.generate(start, max_new_tokens=8, do_sample=False)
    script = scripted(greedy, [None] * 10_000, vocab=SMALL_VOCAB)

    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB)
    torch.manual_seed(1234)
    accepted = 0
    for _ in range(SMALL_CHI_SQUARE_SAMPLES):
        script.step = 0
        out = model.generate(start, max_new_tokens=3, do_sample=True, temperature=temperature, top_k=top_k,
                             assistant_model=drafter)
        counts[out[0, 4], out[0, 5]] += 1
        accepted += drafter.last_stats.acceptance_lengths[0] - 1
    assert drafter.last_stats.sampling == mode
    assert 0 < accepted < SMALL_CHI_SQUARE_SAMPLES * 2  # both acceptance and rejection were exercised
    assert chi_square_p_value(counts, expected) > 1e-3, (counts, expected)


def test_sampling_reproducible_under_seed(target):
    drafter = make_drafter(target)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(target.generate(prompt(), max_new_tokens=12, do_sample=True, assistant_model=drafter))
    assert torch.equal(*runs)


def test_default_sampling_rule_is_ratio_where_the_kernels_are_installed(target):
    """'auto' picks ratio (it accepted more than strict at temperature 1 on the default pair) when dflash_hf's
    kernels are importable, as they are here."""
    drafter = make_drafter(target)
    assert drafter.sampling_mode == "auto"
    target.generate(prompt(), max_new_tokens=6, do_sample=True, assistant_model=drafter)
    assert drafter.last_stats.sampling == "ratio"
    drafter.sampling_mode = "sometimes"
    with pytest.raises(ValueError, match="'auto', 'strict' or 'ratio'"):
        target.generate(prompt(), max_new_tokens=6, do_sample=True, assistant_model=drafter)
