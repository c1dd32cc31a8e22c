"""The bench's methods, one function each, and the aggregation of their runs into the results JSON."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target

from dflash_hf.tools import bench, model_card
from dflash_hf.tools.bench import (
    METHOD_LABELS,
    MethodRun,
    aggregate_runs,
    format_dtype_comparison,
    run_dflash,
    run_dflash_lookup,
    run_plain,
    run_prompt_lookup,
    run_transformers_dflash,
    transformers_has_dflash,
)

GREEDY = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def pair():
    target = make_target("llama")
    return target, make_drafter(target, block_size=4)


@pytest.fixture(scope="module")
def prompt_and_plain(pair):
    target, _ = pair
    # A repeated stretch, so that prompt lookup finds n-grams to propose.
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3)).repeat(1, 2)
    return ids, target.generate(ids, **GREEDY)


def test_plain_is_generate_with_its_wall_time(pair, prompt_and_plain):
    ids, expected = prompt_and_plain
    run = run_plain(pair[0], ids, **GREEDY)
    assert torch.equal(run.output, expected) and run.new_tokens == 12 and run.seconds > 0
    assert run.verify_steps == 0 and run.acceptance_lengths == []


def test_dflash_reports_the_drafter_s_step_statistics(pair, prompt_and_plain):
    target, drafter = pair
    ids, expected = prompt_and_plain
    run = run_dflash(target, drafter, ids, **GREEDY)
    stats = drafter.last_stats
    assert torch.equal(run.output, expected) and run.new_tokens == 12
    assert run.acceptance_lengths == stats.acceptance_lengths and run.verify_steps == len(stats.acceptance_lengths) > 0
    assert run.verified_tokens == sum(stats.acceptance_lengths)
    assert (run.draft_s, run.verify_s) == (stats.draft_time_s, stats.verify_time_s)


def test_prompt_lookup_is_lossless_and_reports_no_steps(pair, prompt_and_plain):
    ids, expected = prompt_and_plain
    run = run_prompt_lookup(pair[0], ids, **GREEDY)
    assert torch.equal(run.output, expected) and run.verify_steps == 0


@pytest.mark.skipif(not transformers_has_dflash(), reason="this transformers has no DFlash path of its own")
def test_transformers_dflash_counts_the_verifying_forwards(pair, prompt_and_plain):
    target, drafter = pair
    ids, expected = prompt_and_plain
    forwards = []
    hook = target.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        run = run_transformers_dflash(target, bench.TransformersDFlashAdapter(drafter), ids, **GREEDY)
    finally:
        hook.remove()
    assert torch.equal(run.output, expected)
    assert run.verify_steps == len(forwards) - 1 > 0 and run.verified_tokens == 11  # the prefill commits one token
    assert not target._forward_pre_hooks  # the counter is removed


def _run(tokens: list[int], seconds: float, **steps) -> MethodRun:
    return MethodRun(torch.tensor([tokens]), seconds, len(tokens), **steps)


def test_aggregation_of_hand_made_runs():
    runs = [
        {"plain": _run([1, 2, 3, 4], 2.0),
         "dflash": _run([1, 2, 3, 4], 1.0, verify_steps=2, verified_tokens=4, acceptance_lengths=[3, 1],
                        draft_s=0.2, verify_s=0.6),
         "prompt_lookup": _run([1, 2, 3, 5], 4.0)},
        {"prompt_lookup": _run([7, 8], 1.0),  # the order a prompt ran in does not matter
         "dflash": _run([7, 8], 1.0, verify_steps=1, verified_tokens=2, acceptance_lengths=[2], draft_s=0.1,
                        verify_s=0.3),
         "plain": _run([7, 8], 1.0)},
    ]
    methods = ("plain", "dflash", "prompt_lookup")
    results = aggregate_runs(["a", "b"], runs, methods, block_size=4, two_row_ms=lambda: 40.0)
    assert list(results) == ["lossless", "mismatched_prompts", "methods", "acceptance_histogram", "step_cost",
                             "block_size", "per_prompt"]
    assert results["lossless"] is False and results["mismatched_prompts"] == {"dflash": [], "prompt_lookup": [0]}
    assert results["methods"] == {
        "plain": {"tokens_per_s": 2.0, "speedup": 1.0, "mean_acceptance_length": None},
        "dflash": {"tokens_per_s": 3.0, "speedup": 1.5, "mean_acceptance_length": 2.0},
        "prompt_lookup": {"tokens_per_s": 1.2, "speedup": 0.6, "mean_acceptance_length": None},
    }
    assert results["acceptance_histogram"] == {1: 1, 2: 1, 3: 1}
    assert results["step_cost"] == {"plain_ms_per_token": 500.0, "draft_ms_per_step": 100.0,
                                    "verify_ms_per_step": 300.0, "break_even_acceptance_length": 0.8,
                                    "two_row_forward_ms": 40.0, "speedup_over_two_row_decode": 0.2}
    assert results["block_size"] == 4
    assert results["per_prompt"] == [
        {"prompt": "a", "new_tokens": 4, "dflash_lossless": True, "prompt_lookup_lossless": False},
        {"prompt": "b", "new_tokens": 2, "dflash_lossless": True, "prompt_lookup_lossless": True},
    ]


def test_without_dflash_there_is_no_step_cost_and_no_control_is_measured():
    def control():
        raise AssertionError("the CPU control runs only for a DFlash step cost")

    runs = [{"plain": _run([1, 2], 1.0), "prompt_lookup": _run([1, 2], 0.5)}]
    results = aggregate_runs(["a"], runs, ("plain", "prompt_lookup"), block_size=8, two_row_ms=control)
    assert results["step_cost"] is None and results["acceptance_histogram"] == {}
    assert results["methods"]["prompt_lookup"]["speedup"] == 2.0


@pytest.mark.parametrize("methods", [("dflash",), ("plain", "medusa")])
def test_a_bench_needs_plain_and_known_methods(pair, methods):
    with pytest.raises(ValueError, match="'plain'"):
        bench._method_runners(methods, *pair)


def test_the_cpu_control_reads_the_cache_without_a_deprecation_warning(pair, monkeypatch):
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, message, *a, **k: said.append(message),
                        raising=False)
    target, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms = bench.two_row_forward_ms(target, torch.arange(10)[None], repeats=3)
    assert ms > 0 and not [m for m in said if "deprecated" in str(m)], said


def test_the_table_the_plot_and_the_card_name_the_methods_alike():
    results = {"methods": {m: {"tokens_per_s": 1.0, "speedup": 1.0, "mean_acceptance_length": None}
                           for m in METHOD_LABELS},
               "lossless": True, "num_prompts": 1, "max_new_tokens": 4}
    table = bench.format_table(results)
    card = model_card._bench_view({**dict.fromkeys(model_card.BENCH_KEYS), **results, "command": "dflash-hf bench"})
    assert all(label in table for label in METHOD_LABELS.values())
    assert sorted(row["label"] for row in card["rows"]) == sorted(METHOD_LABELS.values())


def test_dflash_with_prompt_lookup_is_lossless_and_counts_its_lookups(pair, prompt_and_plain):
    target, drafter = pair
    ids, expected = prompt_and_plain
    run = run_dflash_lookup(target, drafter, ids, **GREEDY)
    assert torch.equal(run.output, expected) and run.verify_steps == len(drafter.last_stats.acceptance_lengths)
    assert drafter.last_stats.lookup_proposals > 0  # the prompt repeats itself: lookups were verified


def _bench_results(dtype: str, plain_rate: float, dflash: float, mismatched: list[int], control: list[int] | None):
    results = {"dtype": dtype, "num_prompts": 4, "mismatched_prompts": {"dflash": mismatched},
               "methods": {"plain": {"tokens_per_s": plain_rate, "speedup": 1.0, "mean_acceptance_length": None},
                           "dflash": {"tokens_per_s": plain_rate * dflash, "speedup": dflash,
                                      "mean_acceptance_length": 1.5}}}
    if control is not None:
        results["plain_batch_of_two_mismatched_prompts"] = control
    return results


def test_the_dtype_comparison_has_a_row_per_dtype_with_its_mismatches_and_control():
    table = format_dtype_comparison({"float32": _bench_results("float32", 24.0, 1.08, [], []),
                                     "bfloat16": _bench_results("bfloat16", 22.0, 1.17, [0, 2], [1])}).splitlines()
    assert table[0] == ("| dtype | plain tok/s | DFlash (dflash-hf loop) | accept len | identical to plain | "
                        "plain batch of 2 identical |")
    assert table[2] == "| float32 | 24.00 | 1.08x | 1.50 | dflash 4/4 | 4/4 |"
    assert table[3] == "| bfloat16 | 22.00 | 1.17x | 1.50 | dflash 2/4 | 3/4 |"
    assert format_dtype_comparison({"float16": _bench_results("float16", 1.0, 1.0, [], None)}).endswith("| - |")
