"""Prompt-lookup proposals in the DFlash loop (lookup_dflash): an n-gram continuation from the row's own sequence is
verified instead of the drafter's block where it is expected to bring more, and the output is plain generate's
token for token whichever proposal each step took."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, Script, make_drafter, make_target
from test_batched import left_pad, prompts
from test_draft_schedule import FLAT, STEEP

from dflash_hf.core.draft_dflash import DraftSession
from dflash_hf.core.lookup_dflash import LookupChooser, ngram_continuation
from dflash_hf.core.schedule_dflash import AcceptanceProfile, DraftSchedule, VerifyCosts


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor(tokens)


# ------------------------------------------------------------------------------------------------------------------
# Finding a proposal
# ------------------------------------------------------------------------------------------------------------------
def test_the_longest_suffix_that_occurs_earlier_is_matched_at_its_latest_occurrence():
    #                  0  1  2  3  4  5  6  7  8  9 10 11
    seq = ids(7, 1, 2, 3, 9, 1, 2, 3, 4, 8, 2, 3)
    tokens, n = ngram_continuation(seq, max_ngram=3, num_tokens=3)
    assert n == 2 and tokens.tolist() == [4, 8, 2]  # "2 3" last occurred at 6-7 (not 2-3), followed by 4 8 2
    tokens, n = ngram_continuation(ids(5, 6, 7, 1, 6, 7), max_ngram=3, num_tokens=10)
    assert n == 2 and tokens.tolist() == [1, 6, 7]  # capped by the sequence's end, never past it
    tokens, n = ngram_continuation(ids(5, 6, 7, 1, 6, 7), max_ngram=1, num_tokens=1)
    assert n == 1 and tokens.tolist() == [1]


def test_a_suffix_found_nowhere_earlier_proposes_nothing():
    for seq in (ids(1, 2, 3, 4), ids(4), ids(3, 3)[:1]):
        tokens, n = ngram_continuation(seq, max_ngram=3, num_tokens=5)
        assert n == 0 and tokens.numel() == 0
    tokens, n = ngram_continuation(ids(3, 3), max_ngram=3, num_tokens=5)  # "3" then "3": proposes the follower
    assert n == 1 and tokens.tolist() == [3]


# ------------------------------------------------------------------------------------------------------------------
# Choosing who drafts
# ------------------------------------------------------------------------------------------------------------------
def _profile(slots: int, accept: float) -> AcceptanceProfile:
    profile = AcceptanceProfile(slots)
    profile.reached, profile.hits = [1e6] * slots, [accept * 1e6] * slots
    return profile


def _chooser(drafter_accept: float, lookup_accept: float, costs=None) -> LookupChooser:
    drafter = torch.nn.Module()
    drafter.acceptance_profile = _profile(7, drafter_accept)
    schedule = None if costs is None else DraftSchedule(costs, drafter.acceptance_profile, 7)
    chooser = LookupChooser(drafter, num_tokens=4, max_ngram=2, max_drafts=7, schedule=schedule)
    chooser.profiles[2] = _profile(4, lookup_accept)
    return chooser


REPEATING = ids(1, 2, 3, 4, 5, 1, 2)  # "1 2" recurs: proposes 3 4 5 1
FRESH = ids(9, 8, 7, 6)


def test_rows_take_the_proposal_expected_to_commit_more_and_the_drafter_runs_only_if_one_row_needs_it():
    good_lookup = _chooser(drafter_accept=0.3, lookup_accept=0.9)
    step = good_lookup.propose([REPEATING, REPEATING], room=[10, 10], drafter_drafts=7)
    assert step.lookup == [True, True] and not step.run_drafter  # no row needs the drafter: its forward is saved
    assert step.tokens[0].tolist() == [3, 4, 5, 1] and step.ngram == [2, 2]
    step = good_lookup.propose([REPEATING, FRESH], room=[10, 10], drafter_drafts=7)
    assert step.lookup == [True, False] and step.run_drafter
    good_drafter = _chooser(drafter_accept=0.95, lookup_accept=0.5)
    assert good_drafter.propose([REPEATING], room=[10], drafter_drafts=7).lookup == [False]


def test_a_row_near_its_limit_is_proposed_no_more_than_it_may_verify():
    step = _chooser(0.3, 0.9).propose([REPEATING, REPEATING], room=[2, 0], drafter_drafts=7)
    assert [t.tolist() for t in step.tokens] == [[3, 4], []]


def test_with_costs_a_step_of_lookups_alone_beats_paying_for_the_drafter_when_rows_are_dear():
    # Two rows; the fresh one would gain from the drafter, but on STEEP costs every extra row is dear and the
    # drafter's block is wide: verifying only the lookup is expected to be faster.
    step = _chooser(0.5, 0.95, costs=STEEP).propose([REPEATING, FRESH], room=[10, 10], drafter_drafts=7)
    assert not step.run_drafter and step.lookup == [True, False]
    # Where rows are almost free, the drafter's block is worth running for the fresh row.
    step = _chooser(0.5, 0.95, costs=FLAT).propose([REPEATING, FRESH], room=[10, 10], drafter_drafts=7)
    assert step.run_drafter and step.lookup == [True, False]


def test_with_costs_a_lookup_verifies_only_the_prefix_that_pays_for_its_rows():
    # One row; 4 rows cost what 1 does, each row past them a whole plain step: at 0.9 a slot, the 4th lookup token
    # (a 5th row) is expected to bring 0.66 of a token for another full step, so three of the four are verified.
    dear_past_four = VerifyCosts({1: 0.010, 4: 0.010, 5: 0.020, 64: 0.61})
    step = _chooser(0.3, 0.9, costs=dear_past_four).propose([REPEATING], room=[10], drafter_drafts=0)
    assert step.lookup == [True] and step.tokens[0].tolist() == [3, 4, 5]
    # Where rows are almost free, and where no costs are known, the whole continuation is verified.
    for costs in (FLAT, None):
        assert _chooser(0.3, 0.9, costs=costs).propose([REPEATING], room=[10], drafter_drafts=7).tokens[0].tolist() \
            == [3, 4, 5, 1]


def test_on_a_plain_step_a_lookup_is_taken_only_where_it_beats_plain_decoding():
    assert _chooser(0.5, 0.95, costs=FLAT).propose([REPEATING], room=[10], drafter_drafts=0).lookup == [True]
    assert _chooser(0.5, 0.01, costs=STEEP).propose([REPEATING], room=[10], drafter_drafts=0).lookup == [False]


def test_the_lookup_profile_is_counted_per_ngram_size_and_kept_on_the_drafter():
    drafter = torch.nn.Module()
    chooser = LookupChooser(drafter, num_tokens=4, max_ngram=2, max_drafts=7, schedule=None)
    # Both start from the same prior (0.5 a slot): 4 lookup tokens are expected to bring more than 3 drafts.
    step = chooser.propose([REPEATING], room=[10], drafter_drafts=3)
    assert step.lookup == [True]
    chooser.observe(step, accepted=[3], drafter_drafts=[0])
    assert drafter.lookup_acceptance_profiles[2].reached == [1, 1, 1, 1]
    assert drafter.lookup_acceptance_profiles[2].hits == [1, 1, 1, 0]
    assert drafter.acceptance_profile.reached == [0] * 7  # the drafter's rows only feed the drafter's profile


# ------------------------------------------------------------------------------------------------------------------
# Lossless in the loop
# ------------------------------------------------------------------------------------------------------------------
PROMPT_SEEDS = (1, 2)  # their greedy continuations repeat themselves (checked below), so lookups get accepted


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("seed", "how"), [(PROMPT_SEEDS[0], "generate kwarg"), (PROMPT_SEEDS[1], "drafter attribute")])
def test_dflash_with_prompt_lookup_equals_plain_generate(family, seed, how):
    target = make_target(family)
    drafter = make_drafter(target, block_size=8)
    prompt = _prompt(seed)
    plain = target.generate(prompt, max_new_tokens=48, do_sample=False)
    kwargs = {"prompt_lookup_num_tokens": 6} if how == "generate kwarg" else {}
    if how == "drafter attribute":
        drafter.prompt_lookup_num_tokens = 6
    fast = target.generate(prompt, max_new_tokens=48, do_sample=False, assistant_model=drafter, **kwargs)
    assert torch.equal(plain, fast)
    stats = drafter.last_stats
    assert stats.lookup_proposals > 0
    assert sum(stats.acceptance_lengths) == stats.new_tokens - 1  # the prefill's token aside, every token verified


def test_lookups_raise_acceptance_where_the_drafter_is_always_wrong(scripted):
    """Known acceptance: a scripted drafter whose first draft is always wrong commits exactly one token a step;
    every step that commits more got it from a verified lookup."""
    target = make_target("llama")
    prompt = _prompt(2)
    plain = target.generate(prompt, max_new_tokens=48, do_sample=False)
    tail = plain[0, 6:].tolist()
    assert any(tail[i : i + 3] == tail[j : j + 3] for i in range(len(tail)) for j in range(i + 1, len(tail)))
    drafter = make_drafter(target, block_size=8)
    scripted(plain, [1] * 100)
    alone = target.generate(prompt, max_new_tokens=48, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, alone) and set(drafter.last_stats.acceptance_lengths) == {1}
    alone_steps = len(drafter.last_stats.acceptance_lengths)
    fast = target.generate(prompt, max_new_tokens=48, do_sample=False, assistant_model=drafter,
                           prompt_lookup_num_tokens=6)
    assert torch.equal(plain, fast)
    stats = drafter.last_stats
    assert stats.mean_acceptance_length > 1.2
    assert len(stats.acceptance_lengths) < alone_steps  # fewer target forwards for the same tokens
    hits = sum(sum(p.hits) for p in drafter.lookup_acceptance_profiles.values())
    assert hits == sum(stats.acceptance_lengths) - len(stats.acceptance_lengths)  # every extra token was a lookup's


def test_a_batch_with_prompt_lookup_equals_plain_batched_generate(family):
    target = make_target(family)
    rows = prompts() + [torch.cat([p[0] for p in (_prompt(1), _prompt(1))])]
    ids_, mask = left_pad(rows)
    plain = target.generate(ids_, attention_mask=mask, max_new_tokens=33, do_sample=False)
    for costs in (None, FLAT, STEEP):
        drafter = make_drafter(target, block_size=8)
        if costs is not None:
            drafter.num_speculative_tokens, drafter.verify_costs = "auto", costs
        fast = target.generate(ids_, attention_mask=mask, max_new_tokens=33, do_sample=False,
                               assistant_model=drafter, prompt_lookup_num_tokens=5, max_matching_ngram_size=2)
        assert torch.equal(plain, fast), costs
        if costs is not STEEP:  # on STEEP every extra row costs more than a lookup is expected to bring
            assert drafter.last_stats.lookup_proposals > 0, costs


def test_skipped_drafter_forwards_keep_every_position_for_its_next_draft(monkeypatch):
    """Steps that verify only lookups run no drafter forward; the next draft still sees each position once."""
    target = make_target("llama")
    prompt = _prompt(2)
    plain = target.generate(prompt, max_new_tokens=48, do_sample=False)
    drafter = make_drafter(target, block_size=8)
    drafter.acceptance_profile = AcceptanceProfile(7)  # the drafter looks hopeless, so lookups run alone
    drafter.acceptance_profile.reached, drafter.acceptance_profile.hits = [1e6] * 7, [0.0] * 7
    script = Script(plain, [1] * 100, VOCAB)
    real_propose, seen = DraftSession.propose, []

    def propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts=None):
        real_propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts)
        seen.append((int(anchor_position[0]), context_positions[0].tolist()))
        return script.propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts)

    monkeypatch.setattr(DraftSession, "propose", propose)
    fast = target.generate(prompt, max_new_tokens=48, do_sample=False, assistant_model=drafter,
                           prompt_lookup_num_tokens=6)
    assert torch.equal(plain, fast)
    assert drafter.last_stats.drafter_forwards_skipped > 0 and len(seen) >= 2
    covered = [p for _, positions in seen for p in positions]
    assert covered == list(range(seen[-1][0]))


# ------------------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------------------
def test_prompt_lookup_with_sampling_or_bad_settings_is_refused():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="greedy decoding only"):
        target.generate(prompt, max_new_tokens=4, do_sample=True, assistant_model=drafter, prompt_lookup_num_tokens=4)
    drafter.prompt_lookup_num_tokens = 0
    with pytest.raises(ValueError, match="drafter.prompt_lookup_num_tokens must be a positive int"):
        target.generate(prompt, max_new_tokens=4, assistant_model=drafter)
    drafter.prompt_lookup_num_tokens, drafter.prompt_lookup_max_ngram = 4, 0
    with pytest.raises(ValueError, match="drafter.prompt_lookup_max_ngram must be a positive int"):
        target.generate(prompt, max_new_tokens=4, assistant_model=drafter)
    drafter.prompt_lookup_max_ngram, drafter.generation_loop = 3, "transformers"
    with pytest.raises(ValueError, match="needs generation_loop = 'dflash'"):
        target.generate(prompt, max_new_tokens=4, assistant_model=drafter)


def test_prompt_lookup_in_transformers_loop_is_refused_not_ignored():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.generation_loop = "transformers"
    with pytest.raises(ValueError, match="needs drafter.generation_loop = 'dflash'"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, assistant_model=drafter,
                        prompt_lookup_num_tokens=4)
