"""The learning-curve benchmark's extrapolation: a curve that grows with ln(minutes) is solved for the minutes at
which it reaches the goal, and a flat or falling one is said never to reach it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curves.py"


@pytest.fixture(scope="module")
def curves():
    spec = importlib.util.spec_from_file_location("learning_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _points(tau_of_minutes, minutes=(2, 4, 8, 16)):
    return [{"train_minutes": m, "decode_weighted_accept_len": tau_of_minutes(m)} for m in minutes]


def test_a_log_linear_curve_is_solved_for_the_goal(curves):
    fit = curves.extrapolate(_points(lambda m: 1.0 + 0.25 * math.log(m)))
    assert fit["slope_per_e_fold"] == pytest.approx(0.25)
    assert fit["minutes_to_goal"] == pytest.approx(math.exp((curves.GOAL - 1.0) / 0.25))


@pytest.mark.parametrize("slope", [0.0, -0.1])
def test_a_flat_or_falling_curve_never_reaches_the_goal(curves, slope):
    assert curves.extrapolate(_points(lambda m: 1.4 + slope * math.log(m)))["minutes_to_goal"] is None


def test_one_point_is_not_a_curve(curves):
    assert curves.extrapolate(_points(lambda m: 1.4, minutes=(3,))) == {"slope_per_e_fold": None,
                                                                         "minutes_to_goal": None}
