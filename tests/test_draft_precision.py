"""The drafter dtype chosen by measurement on the running machine (dflash_hf/tools/draft_precision.py, --drafter-dtype auto)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target

import dflash_hf.tools.draft_precision as precision


def test_draft_timings_measure_every_candidate_and_leave_the_drafter_alone():
    target = make_target("qwen3", dtype=torch.float32)
    drafter = make_drafter(target).float()
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    timings = precision.draft_timings(target, drafter, timed=3)
    assert set(timings) == {torch.float32, torch.bfloat16} and all(s > 0 for s in timings.values())
    assert drafter.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in drafter.state_dict().items())


@pytest.mark.parametrize("bfloat16_s, chosen", [(0.5, torch.bfloat16), (0.95, torch.float32), (2.0, torch.float32)])
def test_bfloat16_is_taken_only_when_clearly_faster(monkeypatch, bfloat16_s, chosen):
    monkeypatch.setattr(precision, "draft_timings",
                        lambda target, drafter: {torch.float32: 1.0, torch.bfloat16: bfloat16_s})
    target = make_target("llama", dtype=torch.float32)
    dtype, timings = precision.fastest_drafter_dtype(target, make_drafter(target).float())
    assert dtype == chosen and timings[torch.bfloat16] == bfloat16_s


def test_only_a_float32_cpu_pair_has_a_choice(monkeypatch):
    def never(target, drafter):
        raise AssertionError("nothing to measure")

    monkeypatch.setattr(precision, "draft_timings", never)
    target = make_target("llama", dtype=torch.bfloat16)
    assert precision.fastest_drafter_dtype(target, make_drafter(target)) == (torch.bfloat16, {})
    target32 = make_target("llama", dtype=torch.float32)
    assert precision.fastest_drafter_dtype(target32, make_drafter(target32).double()) == (torch.float64, {})


def test_a_bfloat16_drafter_of_a_float32_target_stays_lossless_with_known_acceptance(scripted):
    target = make_target("qwen3", dtype=torch.float32)
    drafter = make_drafter(target).to(torch.bfloat16)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
    unscripted = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter)
    assert torch.equal(unscripted, plain)  # the real (bfloat16, untrained) drafts: rejected, output unchanged
    scripted(plain, [None, 2, 1, 3])
    fast = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter)
    assert torch.equal(fast, plain)
    assert drafter.last_stats.acceptance_lengths[:4] == [drafter.block_size, 2, 1, 3]
