"""Drafts per step chosen by cost (num_speculative_tokens = "auto"): the choice follows what verifying costs and what
drafts bring, falls back to plain decoding where nothing pays, and never changes a token."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, Script, make_drafter, make_target
from test_batched import left_pad, prompts

from dflash_hf.core.schedule_dflash import PROBE_EVERY, AcceptanceProfile, DraftSchedule, VerifyCosts
from dflash_hf.tools.calibration import Calibration, measure_verify_costs, target_key

FLAT = VerifyCosts({1: 0.010, 64: 0.0105})  # rows nearly free: verify the whole block
STEEP = VerifyCosts({1: 0.010, 2: 0.030, 64: 1.3})  # every extra row costs two plain steps: never worth drafting
KNEE = VerifyCosts({1: 0.010, 4: 0.011, 5: 0.030, 64: 0.5})  # 4 rows (3 drafts) cost little, the fifth a lot


def test_verify_costs_interpolate_between_and_extrapolate_past_their_rows():
    costs = VerifyCosts({1: 1.0, 3: 2.0, 5: 6.0})
    assert [costs.at(n) for n in (1, 2, 3, 4, 5, 7)] == [1.0, 1.5, 2.0, 4.0, 6.0, 10.0]
    with pytest.raises(ValueError, match="one row included"):
        VerifyCosts({2: 1.0})
    with pytest.raises(ValueError, match="positive seconds"):
        VerifyCosts({1: 1.0, 4: -1.0})


def test_acceptance_profile_counts_each_slot_reached_and_taken():
    profile = AcceptanceProfile(4)
    profile.observe(accepted=2, verified=4)  # slots 0, 1 taken, slot 2 reached and rejected, slot 3 unseen
    profile.observe(accepted=4, verified=4)
    assert profile.reached == [2, 2, 2, 1] and profile.hits == [2, 2, 1, 1]
    rates = profile.rates()  # prior: 4 observations at 0.5
    assert rates == pytest.approx([4 / 6, 4 / 6, 3 / 6, 3 / 5])
    assert profile.expected_tokens(2) == pytest.approx(1 + 4 / 6 + (4 / 6) ** 2)


def _schedule(costs: VerifyCosts, accept: float, most: int = 7) -> DraftSchedule:
    profile = AcceptanceProfile(most)
    profile.reached, profile.hits = [1e6] * most, [accept * 1e6] * most
    return DraftSchedule(costs, profile, most)


@pytest.mark.parametrize(("costs", "accept", "drafts"), [(FLAT, 0.7, 7), (KNEE, 0.7, 3), (KNEE, 0.02, 0),
                                                         (STEEP, 0.9, 0)])
def test_the_schedule_takes_the_drafts_with_the_most_tokens_per_second(costs, accept, drafts):
    schedule = _schedule(costs, accept)
    schedule.drafts()  # a first step always drafts (a probe), whatever the estimate
    assert schedule.drafts() == drafts
    assert schedule.plain_expected_faster == (drafts == 0)


def test_where_plain_decoding_wins_it_still_drafts_one_step_in_probe_every():
    schedule = _schedule(STEEP, 0.9)
    chosen = [schedule.drafts() for _ in range(3 * PROBE_EVERY)]
    assert [i for i, n in enumerate(chosen) if n] == [0, PROBE_EVERY, 2 * PROBE_EVERY]


def test_the_schedule_learns_acceptance_from_the_steps_it_observes():
    schedule = DraftSchedule(KNEE, AcceptanceProfile(7), 7)
    for _ in range(200):  # every draft rejected at once
        schedule.observe(3, [0], draft_s=0.001, verify_s=0.011)
    schedule.drafts()
    assert schedule.drafts() == 0
    for _ in range(400):  # then every verified draft accepted
        schedule.observe(3, [3], draft_s=0.001, verify_s=0.011)
    assert schedule.drafts() == 3


def _auto(drafter, costs: VerifyCosts):
    drafter.num_speculative_tokens = "auto"
    drafter.verify_costs = costs
    return drafter


@pytest.mark.parametrize("costs", [FLAT, KNEE, STEEP], ids=["whole-block", "three-drafts", "plain"])
def test_every_choice_of_drafts_gives_plain_generate_s_tokens(family, scripted, costs):
    target = make_target(family)
    drafter = _auto(make_drafter(target, block_size=8), costs)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(11))
    plain = target.generate(prompt, max_new_tokens=40, do_sample=False)
    scripted(plain, [None, 2, None, 5, 1, None] * 8)
    fast = target.generate(prompt, max_new_tokens=40, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    widths, lengths = drafter.last_stats.drafts_per_step, drafter.last_stats.acceptance_lengths
    assert len(widths) == len(lengths)
    if costs is STEEP:  # plain steps commit one token each, a probe every PROBE_EVERY steps
        assert [i for i, n in enumerate(widths) if n] == list(range(0, len(widths), PROBE_EVERY))
    else:  # the choice, capped near max_new_tokens (the pending token and what is committed count)
        choice = 7 if costs is FLAT else 3
        assert widths == [min(choice, 40 - 1 - (1 + sum(lengths[:s]))) for s in range(len(widths))]


def test_a_real_drafter_with_every_schedule_is_lossless_in_a_batch(family):
    target = make_target(family)
    ids, mask = left_pad(prompts())
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=17, do_sample=False)
    for costs in (FLAT, KNEE, STEEP):
        drafter = _auto(make_drafter(target, block_size=8), costs)
        fast = target.generate(ids, attention_mask=mask, max_new_tokens=17, do_sample=False, assistant_model=drafter)
        assert torch.equal(plain, fast), costs


def test_a_plain_step_keeps_the_drafter_s_context_for_its_next_draft(monkeypatch):
    """After plain steps, the next draft sees every position the drafter missed (none lost, none twice)."""
    from dflash_hf.core.draft_dflash import DraftSession

    target = make_target("qwen3")
    drafter = _auto(make_drafter(target, block_size=8), STEEP)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    plain = target.generate(prompt, max_new_tokens=2 * PROBE_EVERY + 4, do_sample=False)
    script = Script(plain, [], VOCAB)
    real_propose = DraftSession.propose
    seen = []

    def propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts=None):
        real_propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts)  # fills its cache
        seen.append((int(anchor_position[0]), context_positions[0].tolist()))
        return script.propose(session, anchor, anchor_position, context_taps, context_positions, num_drafts)

    monkeypatch.setattr(DraftSession, "propose", propose)
    fast = target.generate(prompt, max_new_tokens=2 * PROBE_EVERY + 4, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    assert len(seen) >= 2
    covered = [p for _, positions in seen for p in positions]
    assert covered == list(range(seen[-1][0]))  # every committed position exactly once, in order


def test_auto_without_costs_or_with_transformers_loop_is_refused():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    drafter.num_speculative_tokens = "auto"
    with pytest.raises(ValueError, match="verify_costs is not set: measure them once with"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, assistant_model=drafter)
    drafter.verify_costs, drafter.generation_loop = FLAT, "transformers"
    with pytest.raises(ValueError, match="needs generation_loop = 'dflash'"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, assistant_model=drafter)


def test_verify_costs_are_measured_once_and_cached_per_target(tmp_path):
    target = make_target("qwen3")
    costs = measure_verify_costs(target, rows=(1, 4, 8), context=16, repeats=2)
    assert sorted(costs.seconds) == [1, 4, 8] and all(s > 0 for s in costs.seconds.values())
    calibration = Calibration(tmp_path / "c.json")
    first, cached = calibration.verify_costs(target)
    assert not cached and calibration.unsaved
    calibration.save()
    again = Calibration.load(tmp_path / "c.json")
    second, cached = again.verify_costs(target)
    assert cached and second.seconds == pytest.approx(first.seconds, rel=1e-3)
    stored = json.loads((tmp_path / "c.json").read_text())["verify_ms"]
    assert list(stored) == [target_key(target)]
