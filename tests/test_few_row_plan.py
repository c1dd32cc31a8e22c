"""The per-machine plan of which product computes a few-row float32 linear on CPU (dflash_hf/matmul_dflash.py)."""

from __future__ import annotations

import json

import pytest
import torch

import dflash_hf.matmul_dflash as core
from conftest import make_drafter, make_target


class FakeTimings:
    """measure(): (BLAS seconds, routine seconds) from a table by rows; counts the calls."""

    def __init__(self, by_rows: dict[int, tuple[float, float]]) -> None:
        self.by_rows, self.calls = by_rows, []

    def __call__(self, weight, rows, bias):
        self.calls.append((tuple(weight.shape), rows, bias is not None))
        return self.by_rows[rows]


def test_the_plan_takes_blas_only_when_clearly_faster(tmp_path):
    timings = FakeTimings({2: (1.0, 2.0), 3: (0.95, 1.0), 4: (3.0, 1.0), 5: (0.89, 1.0)})
    plan = core.FewRowPlan(tmp_path / "plan.json", measure=timings)
    weight = torch.zeros(6, 4)
    assert [plan.use_routine(weight, rows, None) for rows in (2, 3, 4, 5)] == [False, True, True, False]
    assert plan.use_routine(weight, 2, None) is False and len(timings.calls) == 4  # measured once per key
    plan.use_routine(weight, 2, torch.zeros(6))  # a bias is another product
    plan.use_routine(torch.zeros(7, 4), 2, None)  # and so is another shape
    assert timings.calls[4:] == [((6, 4), 2, True), ((7, 4), 2, False)]


def test_the_plan_is_kept_on_disk_per_machine(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "plan.json"
    first = core.FewRowPlan(path, measure=FakeTimings({2: (1.0, 2.0), 8: (5.0, 1.0)}))
    first.use_routine(torch.zeros(6, 4), 2, None)
    first.use_routine(torch.zeros(6, 4), 8, None)
    saved = json.loads(path.read_text())
    assert saved["machine"] == core.machine_key() and sorted(saved["choices"]) == [[6, 4, 2, False, False],
                                                                                   [6, 4, 8, False, True]]

    def never(*args):
        raise AssertionError("a saved choice was measured again")

    again = core.FewRowPlan(path, measure=never)
    assert again.use_routine(torch.zeros(6, 4), 2, None) is False and again.use_routine(torch.zeros(6, 4), 8, None)

    monkeypatch.setattr(core, "machine_key", lambda: "another CPU | torch 0 | 1 threads")
    timings = FakeTimings({2: (3.0, 1.0)})
    assert core.FewRowPlan(path, measure=timings).use_routine(torch.zeros(6, 4), 2, None) is True
    assert timings.calls, "a plan measured on another machine must not be reused"


@pytest.mark.parametrize("content", ["{not json", '{"machine": 3}', '[1, 2]', '{"choices": [[1, "x"]]}'])
def test_an_unreadable_plan_file_is_measured_again_and_rewritten(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_text(content)
    timings = FakeTimings({2: (1.0, 2.0)})
    assert core.FewRowPlan(path, measure=timings).use_routine(torch.zeros(6, 4), 2, None) is False
    assert len(timings.calls) == 1
    assert json.loads(path.read_text())["choices"] == [[6, 4, 2, False, False]]


def test_an_unwritable_cache_leaves_the_plan_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    timings = FakeTimings({2: (1.0, 2.0)})
    plan = core.FewRowPlan(blocker / "plan.json", measure=timings)  # its folder cannot be made
    assert plan.use_routine(torch.zeros(6, 4), 2, None) is False
    assert plan.use_routine(torch.zeros(6, 4), 2, None) is False and len(timings.calls) == 1
    assert list(tmp_path.iterdir()) == [blocker]  # no temporary file left behind


def test_the_mode_routes_what_the_plan_says(monkeypatch):
    routed = []
    original = core.linear_for_few_rows
    monkeypatch.setattr(core, "linear_for_few_rows", lambda x, *a: routed.append(tuple(x.shape)) or original(x, *a))
    plan = core.FewRowPlan(None, measure=FakeTimings({2: (1.0, 2.0), 3: (2.0, 1.0)}))
    layer = torch.nn.Linear(8, 4)
    with core.FewRowLinearMode(plan):
        for rows in (2, 3, 1):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert routed == [(3, 8)]  # 2 rows: BLAS was faster; 1 row: never routed


def test_real_timing_returns_both_products_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    state = torch.get_rng_state()
    blas_s, routine_s = core.time_both_products(weight, 4, bias)
    assert blas_s > 0 and routine_s > 0
    assert torch.equal(torch.get_rng_state(), state)  # sampled generation must not see the calibration


def test_default_plan_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "_default_plans", {})
    monkeypatch.setenv("DFLASH_HF_CACHE", str(tmp_path))
    monkeypatch.setenv(core.PLAN_ENV, "always")
    assert isinstance(core.default_plan(), core.AlwaysRoutine)
    monkeypatch.setenv(core.PLAN_ENV, "sometimes")
    with pytest.raises(ValueError, match="DFLASH_FEW_ROW_PLAN='sometimes': use 'measure'"):
        core.default_plan()
    monkeypatch.setenv(core.PLAN_ENV, "measure")
    plan = core.default_plan()
    assert isinstance(plan, core.FewRowPlan) and plan is core.default_plan()
    assert plan.path.parent == tmp_path and plan.path.name.startswith("few_row_plan-")


def test_generate_under_the_measured_plan_is_lossless_and_saves_the_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "_default_plans", {})
    monkeypatch.setenv("DFLASH_HF_CACHE", str(tmp_path))
    monkeypatch.setenv(core.PLAN_ENV, "measure")
    target = make_target("qwen3", dtype=torch.float32)
    drafter = make_drafter(target, block_size=4).float()
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(target.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=drafter), plain)
    (saved,) = tmp_path.glob("few_row_plan-*.json")
    choices = json.loads(saved.read_text())["choices"]
    assert choices and all(2 <= rows <= 16 and isinstance(routine, bool) for _, _, rows, _, routine in choices)
