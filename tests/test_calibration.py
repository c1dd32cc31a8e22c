"""This machine's one-time calibration (few-row plan, drafter dtype) cached on disk: the second process measures
nothing, a flag or the environment measures again, a damaged file is never trusted, another machine gets its own."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_drafter, make_target

import dflash_hf.core.matmul_dflash as core
import dflash_hf.tools.calibration as calibration_module
import dflash_hf.tools.draft_precision as draft_precision
from dflash_hf.tools.calibration import Calibration, calibration_path, machine_identity


class CountingTimings:
    """A plan's ``measure`` that counts its calls and makes the 4-row padded recipe fastest for every shape."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, weight, rows, bias, ways):
        self.calls += 1
        return [3.0 if way is None else (1.0 if way.rows == 4 else 2.0) for way in ways]


def _plan_after(products: list[tuple[tuple[int, int], int]], calibration: Calibration | None = None):
    timings = CountingTimings()
    plan = core.FewRowPlan(measure=timings)
    if calibration is not None:
        calibration.prime(plan)
    choices = [plan.recipe_for(torch.zeros(shape), rows, None) for shape, rows in products]
    return plan, timings.calls, choices


PRODUCTS = [((6, 4), 3), ((8, 4), 2), ((6, 4), 9)]
MEASURED = 2 * len(core.FEW_ROWS)  # two weight shapes, each timed at every few-row count when first met


def test_a_second_process_measures_nothing(tmp_path):
    path = tmp_path / "calibration.json"
    first = Calibration.load(path)
    plan, calls, choices = _plan_after(PRODUCTS, first)
    assert calls == MEASURED and not first.loaded_from_disk
    assert first.record(plan) == MEASURED
    first.save()

    second = Calibration.load(path)
    _, calls_again, choices_again = _plan_after([*PRODUCTS, ((8, 4), 7)], second)
    assert second.loaded_from_disk and calls_again == 0 and choices_again[:len(PRODUCTS)] == choices
    # ((8, 4), 7): a row count the first process never met (another number of accepted drafts) is cached too
    assert choices[0] == core.FewRowRecipe(4)
    _, calls_new, _ = _plan_after([((16, 4), 3)], second)
    assert calls_new == len(core.FEW_ROWS)  # a shape the cache has not seen is measured


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_recalibrating_starts_empty(how, tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    saved = Calibration.load(path)
    saved.record(_plan_after(PRODUCTS)[0])
    saved.save()
    if how == "environment":
        monkeypatch.setenv(calibration_module.RECALIBRATE_ENV, "1")
        again = Calibration.load(path)
    else:
        again = Calibration.load(path, refresh=True)
    assert not again.loaded_from_disk and again.few_row == {}
    assert _plan_after(PRODUCTS, again)[1] == MEASURED


@pytest.mark.parametrize("damage", ["", "{not json", '{"few_row": []}', '{"few_row": {"1,2": null}, "drafter_dtypes": {}}',
                                    '{"few_row": {"6,4,3,False": [4]}, "drafter_dtypes": {}}',
                                    '{"few_row": {}, "drafter_dtypes": 5}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(damage, tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(damage)
    loaded = Calibration.load(path)
    plan, calls, _ = _plan_after(PRODUCTS, loaded)
    assert calls == MEASURED
    loaded.record(plan)
    loaded.save()
    data = json.loads(path.read_text())
    assert len(data["few_row"]) == MEASURED and data["machine"] == machine_identity()


def test_the_drafter_dtype_is_probed_once_per_machine(tmp_path, monkeypatch):
    probes = []

    def probe(target, drafter):
        probes.append(1)
        return torch.bfloat16, {torch.float32: 0.004, torch.bfloat16: 0.002}

    monkeypatch.setattr(draft_precision, "fastest_drafter_dtype", probe)
    target = make_target("llama")
    drafter = make_drafter(target)
    path = tmp_path / "calibration.json"
    first = Calibration.load(path)
    assert first.fastest_drafter_dtype(target, drafter) == (torch.bfloat16, {torch.float32: 0.004,
                                                                             torch.bfloat16: 0.002}, False)
    assert first.unsaved
    first.save()
    second = Calibration.load(path)
    dtype, timings, cached = second.fastest_drafter_dtype(target, drafter)
    assert (dtype, cached, len(probes)) == (torch.bfloat16, True, 1)
    assert timings == pytest.approx({torch.float32: 0.004, torch.bfloat16: 0.002})
    other = make_drafter(target, block_size=4)  # another drafter shape costs another probe
    assert second.fastest_drafter_dtype(target, other)[2] is False and len(probes) == 2


def test_another_machine_or_library_version_gets_its_own_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DFLASH_HF_CACHE", str(tmp_path))
    here = machine_identity()
    assert calibration_path(here).parent == tmp_path / "calibration"
    assert calibration_path(here) == calibration_path()
    for field, other in [("cpu_model", "Other CPU"), ("cpu_model_number", here["cpu_model_number"] + 1), ("torch_threads", here["torch_threads"] + 1),
                         ("transformers", "0.0.1")]:
        assert field in here
        assert calibration_path({**here, field: other}) != calibration_path(here)
