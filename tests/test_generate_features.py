"""generate features a user reaches for beyond one fresh prompt: a filled cache (multi-turn), per-row logits
processors, several threads on one target, shallow targets, and the options DFlash turns on or refuses."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from test_batched import left_pad, prompts

import dflash_hf
from dflash_hf.core.configuration_dflash import DFlashConfig, default_target_layer_ids
from dflash_hf.core.draft_dflash import DraftSession
from dflash_hf.core.transformers_compat import generate_output_cache_field

CACHE_FIELD = generate_output_cache_field()


def returned_cache(out):
    return getattr(out, CACHE_FIELD)


def turn(target, ids, cache=None, mask=None, **kwargs):
    """One chat turn: generate on ``ids`` (continuing ``cache`` when given) and return the output dict."""
    extra = {} if cache is None else {CACHE_FIELD: cache}
    if mask is not None:
        extra["attention_mask"] = mask
    return target.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True, **extra, **kwargs)


def next_turn_tokens(step: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(rows * 3).view(rows, 3) + 11 + 7 * step


# ---------------------------------------------------------------------------------------------------------------
# 1. A filled cache: only the uncached suffix is prefilled
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_turn", ["plain", "dflash"])
def test_multi_turn_on_a_filled_cache_equals_plain(family, first_turn):
    target = make_target(family)
    drafter = make_drafter(target)
    ids = prompts((6,))[0][None]
    first = turn(target, ids, assistant_model=drafter if first_turn == "dflash" else None)
    plain_seq, plain_cache = first.sequences, returned_cache(first)
    fast_seq, fast_cache = first.sequences, copy.deepcopy(returned_cache(first))
    for step in range(3):
        plain = turn(target, torch.cat((plain_seq, next_turn_tokens(step)), 1), plain_cache)
        fast = turn(target, torch.cat((fast_seq, next_turn_tokens(step)), 1), fast_cache, assistant_model=drafter)
        assert fast.sequences.tolist() == plain.sequences.tolist(), f"turn {step + 2}"
        plain_cache, fast_cache = returned_cache(plain), returned_cache(fast)
        # The cache grew by the new tokens only (the earlier turns were not prefilled again).
        assert fast_cache.get_seq_length() == plain_cache.get_seq_length() == fast.sequences.shape[1] - 1
        plain_seq, fast_seq = plain.sequences, fast.sequences


def test_stop_inside_a_block_returns_plain_generates_cache(scripted):
    """Drafts accepted past an EOS are processed by the verify forward; the returned cache must not keep them."""
    target = make_target("qwen3")
    drafter = make_drafter(target)
    ids = prompts((5,))[0][None]
    reference = target.generate(ids, max_new_tokens=30, do_sample=False)
    eos = int(reference[0, ids.shape[1] + 3])  # the 4th new token, inside the first fully accepted block
    target.generation_config.eos_token_id = eos
    scripted(reference, [None] * 10)
    fast = turn(target, ids, assistant_model=drafter)
    plain = turn(target, ids)
    assert fast.sequences.tolist() == plain.sequences.tolist()
    assert returned_cache(fast).get_seq_length() == returned_cache(plain).get_seq_length()
    follow = torch.cat((fast.sequences, next_turn_tokens(0)), 1)
    target.generation_config.eos_token_id = None
    again = turn(target, follow, returned_cache(fast), assistant_model=drafter)
    assert again.sequences.tolist() == turn(target, follow).sequences.tolist()


def test_next_turn_drafts_with_the_whole_conversation_as_context(monkeypatch):
    """A DFlash turn leaves the drafter's context on the cache it returns: the next turn's first draft is the draft
    a cache-less call over the whole conversation makes. A cache filled by plain generate lacks it."""
    target = make_target("llama")
    drafter = make_drafter(target)
    first_drafts = []
    original = DraftSession.propose

    def recording(session, *args):
        logits = original(session, *args)
        first_drafts.append(logits)
        return logits

    ids = prompts((7,))[0][None]
    first = turn(target, ids, assistant_model=drafter)
    follow = torch.cat((first.sequences, next_turn_tokens(0)), 1)
    monkeypatch.setattr(DraftSession, "propose", recording)

    turn(target, follow, assistant_model=drafter)  # no cache: the whole conversation is prefilled
    whole = first_drafts[0]
    first_drafts.clear()
    turn(target, follow, copy.deepcopy(returned_cache(first)), assistant_model=drafter)
    resumed = first_drafts[0]
    first_drafts.clear()
    turn(target, follow, returned_cache(turn(target, ids)), assistant_model=drafter)  # plain generate's cache
    from_plain = first_drafts[0]

    torch.testing.assert_close(resumed, whole)
    assert not torch.allclose(from_plain, whole)


@pytest.mark.parametrize("family_name", ["qwen3", "llama"])
def test_batched_multi_turn_on_a_filled_cache_equals_plain(family_name):
    target = make_target(family_name)
    target.generation_config.pad_token_id = 0
    drafter = make_drafter(target)
    ids, mask = left_pad(prompts((3, 8, 5)))
    plain = turn(target, ids, mask=mask)
    seq, cache = plain.sequences, returned_cache(plain)
    for step in range(3):
        extended = torch.cat((seq, next_turn_tokens(step, rows=3)), 1)
        extended_mask = torch.cat((mask, torch.ones(3, extended.shape[1] - mask.shape[1], dtype=torch.long)), 1)
        fast = turn(target, extended, copy.deepcopy(cache), mask=extended_mask, assistant_model=drafter)
        plain = turn(target, extended, cache, mask=extended_mask)
        assert fast.sequences.tolist() == plain.sequences.tolist(), f"turn {step + 2}"
        seq, cache, mask = plain.sequences, returned_cache(plain), extended_mask
        mask = torch.cat((mask, torch.ones(3, seq.shape[1] - mask.shape[1], dtype=torch.long)), 1)


def test_cache_holding_the_whole_prompt_is_refused():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    ids = prompts((5,))[0][None]
    first = turn(target, ids)
    with pytest.raises(ValueError, match="strict prefix of the prompt"):
        turn(target, first.sequences[:, :-1], returned_cache(first), assistant_model=drafter)


# ---------------------------------------------------------------------------------------------------------------
# 2-3. Logits processors see the batch as plain generate shows it
# ---------------------------------------------------------------------------------------------------------------
def allowed_for_row(batch_id: int, sentence: torch.Tensor) -> list[int]:
    return [batch_id * 10 + i for i in range(7)]


def test_prefix_allowed_tokens_fn_sees_each_rows_batch_index(family):
    target = make_target(family)
    drafter = make_drafter(target)
    ids, mask = left_pad(prompts((4, 6, 5)))
    kwargs = dict(attention_mask=mask, max_new_tokens=11, do_sample=False, prefix_allowed_tokens_fn=allowed_for_row)
    plain = target.generate(ids, **kwargs)
    fast = target.generate(ids, assistant_model=drafter, **kwargs)
    assert fast.tolist() == plain.tolist()
    assert all(set(plain[r, ids.shape[1]:].tolist()) <= set(allowed_for_row(r, None)) for r in range(3))


def test_row_dependent_processor_in_sampled_drafts():
    """Ratio sampling runs the processors on the drafter's q too, one slot at a time, per batch row."""
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.sampling_mode = "ratio"
    ids, mask = left_pad(prompts((4, 6, 5)))
    torch.manual_seed(0)
    out = target.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=True,
                          prefix_allowed_tokens_fn=allowed_for_row, assistant_model=drafter)
    for r in range(3):
        assert set(out[r, ids.shape[1]:].tolist()) <= set(allowed_for_row(r, None)), f"row {r}"


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_on_a_left_padded_batch(family, penalty):
    target = make_target(family)
    target.generation_config.pad_token_id = 0
    drafter = make_drafter(target)
    ids, mask = left_pad(prompts((4, 9, 2)))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, repetition_penalty=penalty)
    assert target.generate(ids, assistant_model=drafter, **kwargs).tolist() == target.generate(ids, **kwargs).tolist()


# ---------------------------------------------------------------------------------------------------------------
# 4. Several threads, one target
# ---------------------------------------------------------------------------------------------------------------
def test_concurrent_generates_on_one_target_each_equal_plain():
    target = make_target("qwen3")
    drafters = [make_drafter(target, seed=s) for s in (1, 2)]
    rows = prompts((5, 9, 3), seed=3)
    expected = [target.generate(r[None], max_new_tokens=40, do_sample=False).tolist() for r in rows]
    start = threading.Barrier(3)
    results: dict[int, list] = {0: [], 1: [], 2: []}
    errors: list[str] = []

    def worker(index: int) -> None:
        start.wait()
        try:
            for _ in range(4):
                drafter = drafters[index] if index < 2 else None  # thread 2 runs plain generate
                out = target.generate(rows[index][None], max_new_tokens=40, do_sample=False, assistant_model=drafter)
                results[index].append(out.tolist())
        except Exception as error:  # reported below, with the thread it came from
            errors.append(f"thread {index}: {error!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index in range(3):
        assert results[index] == [expected[index]] * 4, f"thread {index}"


# ---------------------------------------------------------------------------------------------------------------
# 5. Taps are distinct layers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", range(1, 40))
@pytest.mark.parametrize("taps", [1, 2, 3, 5, 8])
def test_default_taps_are_distinct_existing_layers(layers, taps):
    ids = default_target_layer_ids(layers, taps)
    assert len(set(ids)) == len(ids) and 1 <= len(ids) <= taps
    assert all(0 <= i < layers for i in ids)
    if layers >= taps + 3:
        assert len(ids) == taps  # deep enough targets get every tap asked for


def test_repeated_taps_in_a_config_are_refused():
    with pytest.raises(ValueError, match=r"taps layer\(s\) \[2\] more than once"):
        DFlashConfig(num_target_layers=8, dflash_config={"mask_token_id": 0, "target_layer_ids": [1, 2, 2]})


def test_shallow_target_gets_a_working_drafter():
    target = make_target("qwen3")  # 4 layers
    drafter = dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=8, num_taps=5).eval()
    assert drafter.config.target_layer_ids == [2]
    ids = prompts((6,))[0][None]
    plain = target.generate(ids, max_new_tokens=10, do_sample=False)
    assert target.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=drafter).tolist() == plain.tolist()


# ---------------------------------------------------------------------------------------------------------------
# 11, 12, 17 and output dtypes: clear errors, or the option honoured
# ---------------------------------------------------------------------------------------------------------------
def test_inputs_embeds_is_refused_by_name():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    embeds = target.get_input_embeddings()(prompts((4,))[0][None])
    with pytest.raises(ValueError, match="inputs_embeds=.*not supported with a DFlash assistant.*Pass input_ids"):
        target.generate(inputs_embeds=embeds, max_new_tokens=4, assistant_model=drafter)


def test_drafter_for_another_vocabulary_is_named_as_such():
    target = make_target("qwen3")
    drafter = dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=8)
    drafter.config.vocab_size = VOCAB // 2
    with pytest.raises(ValueError, match=f"vocabulary of {VOCAB // 2} tokens but the target has {VOCAB}"):
        target.generate(prompts((4,))[0][None], max_new_tokens=4, assistant_model=drafter)


def test_from_target_names_an_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="does not support target model_type 'gpt2' \\(GPT2LMHeadModel\\)"):
        dflash_hf.DFlashDraftModel.from_target(gpt2)


def test_from_target_on_a_meta_device_target():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        target = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="on the meta device"):
        dflash_hf.DFlashDraftModel.from_target(target)


@pytest.mark.parametrize(("name", "value"), [("generation_loop", "bogus"), ("sampling_mode", "fast"),
                                             ("few_row_matmul_on_cpu", "yes")])
def test_unknown_drafter_option_is_refused(name, value):
    target = make_target("qwen3")
    drafter = make_drafter(target)
    setattr(drafter, name, value)
    with pytest.raises(ValueError, match=f"drafter.{name} must be"):
        target.generate(prompts((4,))[0][None], max_new_tokens=4, assistant_model=drafter)


@pytest.mark.parametrize("loop", ["dflash", "transformers"])
def test_use_cache_false_is_turned_on_with_the_same_output(loop):
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.generation_loop = loop
    ids = prompts((5,))[0][None]
    plain = target.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False)
    fast = target.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False, assistant_model=drafter)
    assert fast.tolist() == plain.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_logits_are_float32_like_plain_generate(dtype):
    target = make_target("qwen3", dtype=dtype)
    drafter = make_drafter(target)
    ids = prompts((5,))[0][None]
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  output_scores=True)
    plain = target.generate(ids, **kwargs)
    fast = target.generate(ids, assistant_model=drafter, **kwargs)
    assert [t.dtype for t in fast.logits] == [t.dtype for t in plain.logits] == [torch.float32] * 6
    assert [t.dtype for t in fast.scores] == [t.dtype for t in plain.scores]


def test_transformers_loop_refuses_a_filled_cache():
    """transformers' own assisted loop returns other tokens than plain generate on a filled cache (any assistant:
    prompt lookup too), so that loop is refused there; ours is the default and handles it."""
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.generation_loop = "transformers"
    ids = prompts((6,))[0][None]
    first = turn(target, ids)
    follow = torch.cat((first.sequences, next_turn_tokens(0)), 1)
    with pytest.raises(ValueError, match="cannot continue from a filled cache"):
        turn(target, follow, returned_cache(first), assistant_model=drafter)
