"""Lossless: generate(assistant_model=drafter) equals plain generate token for token, on every family."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class AddBiasOnParity(LogitsProcessor):
    """A processor whose effect depends on the sequence so far: slot-by-slot application matters."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, int(input_ids[0, -1]) % VOCAB] -= 2.0
        scores[:, (int(input_ids.sum()) * 7) % VOCAB] += 1.5
        return scores


@pytest.mark.parametrize("prompt_len, max_new_tokens", [(1, 20), (5, 1), (23, 7)])
def test_greedy_lossless_every_family(family, prompt_len, max_new_tokens):
    target = make_target(family)
    drafter = make_drafter(target, block_size=8)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    plain = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    fast = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    stats = drafter.last_stats
    assert stats.new_tokens == max_new_tokens
    assert sum(stats.acceptance_lengths) >= max_new_tokens - 1
    assert stats.num_target_forwards == len(stats.acceptance_lengths) + 1  # + the prefill
    assert all(1 <= a <= 8 for a in stats.acceptance_lengths)


def test_lossless_with_scripted_acceptance_and_limits_inside_block(family, scripted):
    """Long acceptance (scripted drafts) so that max_new_tokens ends inside a block."""
    target = make_target(family)
    drafter = make_drafter(target, block_size=8)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    plain = target.generate(prompt, max_new_tokens=19, do_sample=False)
    scripted(plain, [None, 3, None, 1])
    fast = target.generate(prompt, max_new_tokens=19, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    # 1 from prefill, then 8 (all 7 drafts + bonus), 3, then the last step is capped by max_new_tokens: 19-12 = 7.
    assert drafter.last_stats.acceptance_lengths == [8, 3, 7]


def test_eos_inside_a_block(family, scripted):
    target = make_target(family)
    drafter = make_drafter(target, block_size=8)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
    eos = int(reference[0, prompt.shape[1] + 4])  # the 5th generated token becomes EOS
    plain = target.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    scripted(reference, [None])
    fast = target.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, assistant_model=drafter)
    assert torch.equal(plain, fast)
    assert int(fast[0, -1]) == eos and fast.shape[1] <= prompt.shape[1] + 5


def test_logits_processors_applied_per_slot(family, scripted):
    target = make_target(family)
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.7, no_repeat_ngram_size=3)
    processors = LogitsProcessorList([AddBiasOnParity()])
    plain = target.generate(prompt, logits_processor=processors, **kwargs)
    scripted(plain, [None, 2, None, 5, None])
    fast = target.generate(prompt, logits_processor=processors, assistant_model=drafter, **kwargs)
    assert torch.equal(plain, fast)
    assert max(drafter.last_stats.acceptance_lengths) == 8  # the scripted full blocks were accepted


def test_random_drafter_several_prompts(family):
    target = make_target(family, seed=7)
    drafter = make_drafter(target, seed=8)
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (1, 4 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        plain = target.generate(prompt, max_new_tokens=15, do_sample=False)
        assert torch.equal(plain, target.generate(prompt, max_new_tokens=15, do_sample=False, assistant_model=drafter))


def test_attention_mask_with_left_padding_single_row():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    prompt = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(prompt)
    mask[:, :3] = 0
    plain = target.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    fast = target.generate(
        prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, assistant_model=drafter
    )
    assert torch.equal(plain, fast)


def test_scripted_acceptance_lengths_exact(scripted):
    target = make_target("qwen3")
    drafter = make_drafter(target, block_size=6)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(12))
    plain = target.generate(prompt, max_new_tokens=40, do_sample=False)
    errors = [1, 2, 3, 4, 5, None, 1, None, 3]
    scripted(plain, errors)
    fast = target.generate(prompt, max_new_tokens=40, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    expected, produced = [], 1
    for slot in errors:
        expected.append(slot if slot is not None else 6)
        produced += expected[-1]
    lengths = drafter.last_stats.acceptance_lengths
    assert lengths[: len(errors)] == expected
    assert sum(lengths) == 40 - 1 and drafter.last_stats.new_tokens == 40
    assert drafter.last_stats.mean_acceptance_length == pytest.approx(sum(lengths) / len(lengths))


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_committed_tokens_in_order(scripted):
    target = make_target("llama")
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(13))
    plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
    scripted(plain, [None, 4])
    streamer = Collect()
    out = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == prompt[0].tolist()
    assert [t for chunk in streamer.chunks[1:] for t in chunk] == out[0, 5:].tolist()
    assert any(len(chunk) > 1 for chunk in streamer.chunks[1:])  # whole accepted blocks arrive at once


class RowStreamer(BaseStreamer):
    """A custom streamer that reads ``value[0]``, as streamers written for transformers' loops do: every put after
    the prompt must be one row, [1, k], as transformers' assisted loop passes it."""

    def __init__(self):
        self.shapes = []
        self.tokens = []

    def put(self, value):
        self.shapes.append(tuple(value.shape))
        self.tokens.append(value[0].tolist())

    def end(self):
        pass


@pytest.mark.parametrize("stop_at", [None, 11])
def test_streamer_gets_one_row_per_put_as_transformers_passes_it(scripted, stop_at):
    target = make_target("llama")
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(13))
    reference = target.generate(prompt, max_new_tokens=20, do_sample=False)
    stop = StoppingCriteriaList([StopAfterToken(int(reference[0, 5 + stop_at]))] if stop_at else [])
    scripted(reference, [None, 4])
    streamer = RowStreamer()
    out = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter, streamer=streamer,
                          stopping_criteria=stop)
    assert streamer.shapes[0] == (1, 5)
    assert all(len(shape) == 2 and shape[0] == 1 for shape in streamer.shapes[1:]), streamer.shapes
    assert [t for chunk in streamer.tokens[1:] for t in chunk] == out[0, 5:].tolist()


@pytest.mark.parametrize("tail, explicit_mask", [([3], False), ([3, 3], False), ([3, 7, 3], False), ([3], True)])
def test_single_prompt_ending_in_the_pad_token_runs_like_plain(family, tail, explicit_mask):
    """One prompt whose last token is the pad token, pad_token_id set: plain generate masks the pad slots (and
    warns only for batches); DFlash runs it too and writes the same tokens."""
    target = make_target(family)
    drafter = make_drafter(target)
    pad = 3
    head = torch.randint(4, VOCAB, (6,), generator=torch.Generator().manual_seed(17))
    prompt = torch.cat((head, torch.tensor(tail)))[None]
    kwargs = dict(max_new_tokens=14, do_sample=False, pad_token_id=pad)
    if explicit_mask:
        kwargs["attention_mask"] = prompt.ne(pad).long()
    plain = target.generate(prompt, **kwargs)
    fast = target.generate(prompt, assistant_model=drafter, **kwargs)
    assert fast.tolist() == plain.tolist()


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_custom_stopping_criteria_inside_block(scripted):
    target = make_target("qwen2")
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(14))
    reference = target.generate(prompt, max_new_tokens=25, do_sample=False)
    stop = StoppingCriteriaList([StopAfterToken(int(reference[0, 5 + 6]))])
    plain = target.generate(prompt, max_new_tokens=25, do_sample=False, stopping_criteria=stop)
    scripted(reference, [None])
    fast = target.generate(prompt, max_new_tokens=25, do_sample=False, stopping_criteria=stop, assistant_model=drafter)
    assert torch.equal(plain, fast)


def test_return_dict_with_scores_and_logits(scripted):
    target = make_target("qwen3")
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(15))
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, repetition_penalty=1.3)
    plain = target.generate(prompt, **kwargs)
    scripted(plain.sequences, [None, 3])
    fast = target.generate(prompt, assistant_model=drafter, **kwargs)
    assert torch.equal(plain.sequences, fast.sequences)
    assert len(fast.scores) == len(plain.scores) == 12 and len(fast.logits) == 12
    for a, b in zip(plain.scores, fast.scores):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)
    for a, b in zip(plain.logits, fast.logits):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)


def test_stock_assisted_loop_drives_candidate_generator(family, scripted):
    """DFlashCandidateGenerator inside transformers' own _assisted_decoding: lossless, hooks removed."""
    target = make_target(family)
    drafter = make_drafter(target)
    drafter.generation_loop = "transformers"
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(16))
    plain = target.generate(prompt, max_new_tokens=18, do_sample=False)
    scripted(plain, [None, 2])
    fast = target.generate(prompt, max_new_tokens=18, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    stats = drafter.last_stats
    assert stats.acceptance_lengths[:2] == [8, 2]
    assert stats.new_tokens == 18 and sum(stats.acceptance_lengths) == 18 - 1  # all but the prefill's token
    assert stats.num_target_forwards == len(stats.acceptance_lengths) + 1
    from dflash_hf.core.pair_dflash import target_decoder_layers

    assert all(not layer._forward_hooks for layer in target_decoder_layers(target))


def test_hooks_removed_when_generation_raises():
    target = make_target("qwen3")
    drafter = make_drafter(target)

    class Boom(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            Boom.calls += 1
            if Boom.calls == 3:
                raise KeyboardInterrupt
            return scores

    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(17))
    with pytest.raises(KeyboardInterrupt):
        target.generate(prompt, max_new_tokens=10, logits_processor=LogitsProcessorList([Boom()]),
                        assistant_model=drafter)
    from dflash_hf.core.pair_dflash import target_decoder_layers

    assert all(not layer._forward_hooks for layer in target_decoder_layers(target))
    fresh = make_target("qwen3")
    assert torch.equal(target.generate(prompt, max_new_tokens=10), fresh.generate(prompt, max_new_tokens=10))


@pytest.mark.parametrize("loop", ["dflash", "transformers"])
def test_fewer_speculative_tokens_per_step(scripted, loop):
    """num_speculative_tokens=3 on a block-8 drafter: every step verifies 3 drafts, so a perfect drafter commits 4."""
    target = make_target("qwen3")
    drafter = make_drafter(target, block_size=8)
    drafter.num_speculative_tokens = 3
    drafter.generation_loop = loop
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    plain = target.generate(prompt, max_new_tokens=17, do_sample=False)
    scripted(plain, [None, 2, None, None, None])
    fast = target.generate(prompt, max_new_tokens=17, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    assert drafter.last_stats.acceptance_lengths == [4, 2, 4, 4, 2]  # 1 + 16 tokens; the last step is capped


@pytest.mark.parametrize("bad", [0, 8, 2.5, True])
def test_impossible_num_speculative_tokens_is_refused(bad):
    target = make_target("qwen3")
    drafter = make_drafter(target, block_size=8)
    drafter.num_speculative_tokens = bad
    with pytest.raises(ValueError, match="num_speculative_tokens must be an int from 1 to block_size - 1 = 7"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, assistant_model=drafter)


def test_routed_linears_route_only_small_float32_cpu_products(monkeypatch):
    import dflash_hf.core.matmul_dflash as core

    routed = []
    original = core.linear_for_few_rows
    monkeypatch.setattr(core, "linear_for_few_rows", lambda x, *a: routed.append(tuple(x.shape)) or original(x, *a))
    layer = torch.nn.Linear(8, 4)
    with core.routed_linears(layer, torch.device("cpu")), core.few_row_products(torch.device("cpu")):
        for shape in [(1, 1, 8), (2, 8), (1, 16, 8), (17, 8), (2, 3, 8)]:
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
        layer.double()(torch.ones(4, 8, dtype=torch.float64))  # float64: BLAS's own product
    assert routed == [(2, 8), (1, 16, 8), (2, 3, 8)]  # 1 row and 17 rows are left to BLAS
    assert "forward" not in layer.__dict__  # the layer is itself again
    layer.float()(torch.ones(4, 8))  # outside nothing is routed
    assert len(routed) == 3
    with core.routed_linears(layer, torch.device("meta")), core.few_row_products(torch.device("meta")):
        assert "forward" not in layer.__dict__  # off CPU there is no plan: the layers are not touched
        layer(torch.ones(4, 8))
    with core.routed_linears(layer, torch.device("cpu"), False):
        assert "forward" not in layer.__dict__  # nor with the routine turned off
    assert len(routed) == 3


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("enabled", ["always", False])
def test_float32_verify_under_the_few_row_routine_is_lossless(scripted, monkeypatch, rows, enabled):
    """The verify forwards and drafts of a float32 CPU target run through the routine (unless the drafter turns it
    off) and still equal plain."""
    import dflash_hf.core.matmul_dflash as core

    routed = []
    original = core.linear_for_few_rows
    monkeypatch.setattr(core, "linear_for_few_rows", lambda x, *a: routed.append(x.shape) or original(x, *a))
    target = make_target("llama", dtype=torch.float32)
    drafter = make_drafter(target, block_size=4).float()
    drafter.few_row_matmul_on_cpu = enabled
    prompt = torch.randint(3, VOCAB, (rows, 6), generator=torch.Generator().manual_seed(5))
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    if rows == 1:
        scripted(plain, [None, 2, None, 3, 1, None])  # long and short acceptances through the routed forwards
    fast = target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=drafter)
    assert torch.equal(fast, plain)
    assert bool(routed) == bool(enabled) and all(2 <= torch.Size(s).numel() // s[-1] <= 16 for s in routed)
    assert not any("forward" in m.__dict__ for m in target.modules())  # the target's layers are restored


def test_lower_precision_drafter_is_lossless_and_casts_the_head_once():
    target = make_target("qwen3")  # float64
    drafter = make_drafter(target).to(torch.bfloat16)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter), plain)
    key, head, vocab = drafter._draft_head_cache
    assert vocab is None  # the whole vocabulary: this drafter has no draft_vocab
    assert head.weight.dtype == torch.bfloat16 and "_draft_head_cache" not in drafter.state_dict()
    torch.testing.assert_close(head.weight.double(), target.lm_head.weight, rtol=1e-2, atol=1e-2)
    target.generate(prompt, max_new_tokens=5, do_sample=False, assistant_model=drafter)
    assert drafter._draft_head_cache[1] is head  # reused across generations
    with torch.no_grad():
        target.lm_head.weight.mul_(1.0)  # an in-place update of the target's head invalidates the copy
    target.generate(prompt, max_new_tokens=5, do_sample=False, assistant_model=drafter)
    assert drafter._draft_head_cache[1] is not head
