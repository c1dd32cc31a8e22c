"""The measured plan of which product computes a few-row float32 linear on CPU (dflash_hf/matmul_dflash.py)."""

from __future__ import annotations

import threading

import pytest
import torch

import dflash_hf.matmul_dflash as core
from conftest import VOCAB, make_drafter, make_target

MEASURED_PLAN = core.measured_plan  # taken at import: conftest's autouse fixture swaps it for every test


class FakeTimings:
    """measure(): (BLAS seconds, routine seconds) from a table by rows; counts the calls."""

    def __init__(self, by_rows: dict[int, tuple[float, float]]) -> None:
        self.by_rows, self.calls = by_rows, []

    def __call__(self, weight, rows, bias):
        self.calls.append((tuple(weight.shape), rows, bias is not None))
        return self.by_rows[rows]


def test_the_plan_takes_blas_only_when_clearly_faster():
    timings = FakeTimings({2: (1.0, 2.0), 3: (0.95, 1.0), 4: (3.0, 1.0), 5: (0.89, 1.0)})
    plan = core.FewRowPlan(measure=timings)
    weight = torch.zeros(6, 4)
    assert [plan.use_routine(weight, rows, None) for rows in (2, 3, 4, 5)] == [False, True, True, False]
    assert plan.use_routine(weight, 2, None) is False and len(timings.calls) == 4  # measured once per key
    plan.use_routine(weight, 2, torch.zeros(6))  # a bias is another product
    plan.use_routine(torch.zeros(7, 4), 2, None)  # and so is another shape
    assert timings.calls[4:] == [((6, 4), 2, True), ((7, 4), 2, False)]
    assert plan.timings[(6, 4, 3, False)] == (0.95, 1.0)


def routing_log(monkeypatch) -> list:
    routed = []
    original = core.linear_for_few_rows
    monkeypatch.setattr(core, "linear_for_few_rows", lambda x, *a: routed.append(tuple(x.shape)) or original(x, *a))
    return routed


def test_planned_products_follow_the_plan(monkeypatch):
    routed = routing_log(monkeypatch)
    plan = core.FewRowPlan(measure=FakeTimings({2: (1.0, 2.0), 3: (2.0, 1.0)}))
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


def test_real_timing_returns_both_products_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    state = torch.get_rng_state()
    blas_s, routine_s = core.time_both_products(weight, 4, bias)
    assert blas_s > 0 and routine_s > 0
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
