"""The measured plan of which product computes a few-row float32 linear on CPU (dflash_hf/core/matmul_dflash.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target

import dflash_hf.core.matmul_dflash as core

MEASURED_PLAN = core.measured_plan  # taken at import: conftest's autouse fixture swaps it for every test


class FakeTimings:
    """measure(): seconds of BLAS (None) and of each recipe, from a table by rows: BLAS's time, then the routine's
    over its own rows; a padded recipe costs ``padded`` per row it computes, a channels-last one ``channels_last``
    less. Counts the calls."""

    def __init__(self, by_rows: dict[int, tuple[float, float]], padded: float = 1.0, channels_last: float = 0.0):
        self.by_rows, self.padded, self.channels_last, self.calls = by_rows, padded, channels_last, []

    def __call__(self, weight, rows, bias, ways):
        self.calls.append((tuple(weight.shape), rows, bias is not None))
        blas_s, routine_s = self.by_rows[rows]
        return [blas_s if way is None else
                (routine_s if way.rows == rows else self.padded * way.rows) - self.channels_last * way.channels_last
                for way in ways]


def test_the_plan_takes_blas_only_when_clearly_faster():
    timings = FakeTimings({2: (1.0, 2.0), 3: (0.95, 1.0), 4: (3.0, 1.0), 5: (0.89, 1.0)}, padded=100.0)
    plan = core.FewRowPlan(measure=timings, together_rows=())  # each row count timed only when asked for
    weight = torch.zeros(6, 4)
    assert [plan.recipe_for(weight, rows, None) for rows in (2, 3, 4, 5)] == [
        None, core.FewRowRecipe(3), core.FewRowRecipe(4), None]
    assert plan.recipe_for(weight, 2, None) is None and len(timings.calls) == 4  # measured once per key
    plan.recipe_for(weight, 2, torch.zeros(6))  # a bias is another product
    plan.recipe_for(torch.zeros(7, 4), 2, None)  # and so is another shape
    assert timings.calls[4:] == [((6, 4), 2, True), ((7, 4), 2, False)]
    assert plan.timings[(6, 4, 3, False)][None] == 0.95
    assert plan.timings[(6, 4, 3, False)][core.FewRowRecipe(3)] == 1.0


def test_a_weight_is_timed_at_every_few_row_count_when_first_met():
    timings = FakeTimings({rows: (1.0, 2.0 if rows % 2 else 0.5) for rows in core.FEW_ROWS}, padded=100.0)
    plan = core.FewRowPlan(measure=timings)
    weight = torch.zeros(6, 4)
    assert plan.recipe_for(weight, 5, None) is None
    assert [rows for _, rows, _ in timings.calls] == [5, *[r for r in core.FEW_ROWS if r != 5]]
    assert plan.recipe_for(weight, 8, None) == core.FewRowRecipe(8)  # already timed: no new call
    assert len(timings.calls) == len(core.FEW_ROWS) and plan.measuring_s > 0
    plan.recipe_for(torch.zeros(7, 4), 16, None)  # another weight shape is timed at every count in turn
    assert len(timings.calls) == 2 * len(core.FEW_ROWS)


def test_the_plan_pads_rows_and_picks_the_copy_where_they_measure_faster():
    # 3 rows cost 5 s, each padded row 1 s: 4 rows (4 s) win over 3, and 8 rows (8 s) lose
    plan = core.FewRowPlan(measure=FakeTimings({3: (10.0, 5.0), 16: (10.0, 5.0)}, channels_last=0.5),
                           together_rows=())
    assert plan.recipe_for(torch.zeros(6, 4), 3, None) == core.FewRowRecipe(4, channels_last=True)
    assert set(plan.timings[(6, 4, 3, False)]) == {None, *core.routine_recipes(3)}
    assert plan.recipe_for(torch.zeros(6, 4), 16, None) == core.FewRowRecipe(16, channels_last=True)  # no pad past 16


def test_recipes_pad_up_to_under_four_times_the_rows():
    assert sorted({r.rows for r in core.routine_recipes(2)}) == [2, 4]
    assert sorted({r.rows for r in core.routine_recipes(3)}) == [3, 4, 8]
    assert sorted({r.rows for r in core.routine_recipes(5)}) == [5, 8, 16]
    assert sorted({r.rows for r in core.routine_recipes(12)}) == [12, 16]
    assert {r.channels_last for r in core.routine_recipes(7)} == {False, True}


@pytest.mark.parametrize("rows", [2, 3, 7, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_every_recipe_computes_the_linear_layer(rows, bias):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(48, 500, bias=bias)
    x = torch.randn(1, rows, 48)
    for recipe in [None, *core.routine_recipes(rows)]:  # None: the default, the rows as they are
        out = core.linear_for_few_rows(x, layer.weight, layer.bias, recipe)
        assert out.shape == (1, rows, 500) and out.is_contiguous(), recipe
        torch.testing.assert_close(out, layer(x))


def routing_log(monkeypatch) -> list:
    routed = []
    original = core.linear_for_few_rows
    monkeypatch.setattr(core, "linear_for_few_rows", lambda x, *a: routed.append(tuple(x.shape)) or original(x, *a))
    return routed


def test_planned_products_follow_the_plan(monkeypatch):
    routed = routing_log(monkeypatch)
    plan = core.FewRowPlan(measure=FakeTimings({2: (1.0, 2.0), 3: (2.0, 1.0)}, padded=100.0), together_rows=())
    layer = core.FewRowLinear(8, 4)
    monkeypatch.setattr(core, "measured_plan", lambda: plan)
    with core.few_row_products(torch.device("cpu"), True):
        for rows in (2, 3, 1):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert routed == [(3, 8)]  # 2 rows: BLAS was faster; 1 row: never routed
    layer(torch.randn(3, 8))  # no plan is current outside few_row_products
    assert routed == [(3, 8)]


def test_settings_pick_the_plan():
    cpu = torch.device("cpu")
    assert isinstance(core._plan_for(cpu, "always"), core.AlwaysRoutine)
    assert core._plan_for(cpu, False) is None and core._plan_for(torch.device("meta"), True) is None


def test_the_plan_is_per_thread_and_the_routing_lasts_while_anyone_holds_it(monkeypatch):
    routed = routing_log(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    hooked = model[1]
    hooked.forward = lambda x: torch.nn.functional.linear(x, hooked.weight, hooked.bias)  # as accelerate's hooks do
    x = torch.randn(3, 8)
    cpu = torch.device("cpu")
    with core.routed_linears(model, cpu):
        with core.routed_linears(model, cpu):  # a second generate call on the same target, concurrently
            pass
        other: list = []
        worker = threading.Thread(target=lambda: other.append(model(x)))  # a plain generate in another thread
        with core.few_row_products(torch.device("cpu"), "always"):
            worker.start()
            worker.join()
            assert routed == []  # that thread has no plan: BLAS, bit for bit
            model(x)
        assert routed == [(3, 8)]  # the first layer only: the hooked one keeps its own forward
    assert "forward" not in model[0].__dict__ and hooked.__dict__["forward"] is not None


def test_the_measured_plan_is_one_per_thread_count(monkeypatch):
    monkeypatch.setattr(core, "measured_plan", MEASURED_PLAN)
    monkeypatch.setattr(core, "_measured_plans", {})
    plan = core.measured_plan()
    assert isinstance(plan, core.FewRowPlan) and plan is core.measured_plan()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert core.measured_plan() is not plan  # timings change with the thread count
    finally:
        torch.set_num_threads(threads)
    assert core._plan_for(torch.device("cpu"), True) is plan


def test_real_timing_returns_every_way_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    state = torch.get_rng_state()
    ways = [None, *core.routine_recipes(4)]
    seconds = core.time_products(weight, 4, bias, ways)
    assert len(seconds) == len(ways) and all(s > 0 for s in seconds)
    assert torch.equal(torch.get_rng_state(), state)  # sampled generation must not see the calibration


@pytest.mark.parametrize("rows", [1, 2])
def test_generate_under_a_measured_plan_is_lossless(monkeypatch, rows):
    plan = core.FewRowPlan()
    monkeypatch.setattr(core, "measured_plan", lambda: plan)
    target = make_target("qwen3", dtype=torch.float32)
    drafter = make_drafter(target, block_size=4).float()
    prompt = torch.randint(3, VOCAB, (rows, 6), generator=torch.Generator().manual_seed(1))
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(target.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=drafter), plain)
    assert plan.choices and all(2 <= rows <= 16 for _, _, rows, _ in plan.choices)  # the forwards met the plan
