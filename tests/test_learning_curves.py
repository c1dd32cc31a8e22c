"""The learning-curve benchmark's extrapolation: a curve whose gain over one token grows as a power of the minutes is
solved for the minutes at which it reaches the goal, and a flat or falling one is said never to reach it."""

from __future__ import annotations

import importlib.util
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


def test_a_power_law_curve_is_solved_for_the_goal(curves):
    fit = curves.extrapolate(_points(lambda m: 1.0 + 0.1 * m**0.5))
    assert fit["exponent"] == pytest.approx(0.5)
    assert fit["minutes_to_goal"] == pytest.approx(((curves.GOAL - 1.0) / 0.1) ** 2)


@pytest.mark.parametrize("alpha", [0.0, -0.2])
def test_a_flat_or_falling_curve_never_reaches_the_goal(curves, alpha):
    assert curves.extrapolate(_points(lambda m: 1.0 + 0.4 * m**alpha))["minutes_to_goal"] is None


def test_points_without_any_gain_and_a_single_point_are_not_a_curve(curves):
    nothing = {"exponent": None, "minutes_to_goal": None}
    assert curves.extrapolate(_points(lambda m: 1.4, minutes=(3,))) == nothing
    assert curves.extrapolate(_points(lambda m: 1.0 if m < 16 else 1.2)) == nothing  # one point above 1


def test_held_out_shards_stay_put_when_a_chitchat_slice_is_committed_after_them(curves):
    before = curves.split_shards(["sharegpt"] * 4, heldout_shards=1)
    assert before == {"train": {"sharegpt": [0, 1, 2]}, "heldout": {"sharegpt": [3]}}
    after = curves.split_shards(["sharegpt"] * 4 + ["chitchat"] * 3, heldout_shards=1)
    assert after["heldout"] == {"sharegpt": [3], "chitchat": [6]}
    assert after["train"] == {"sharegpt": [0, 1, 2], "sharegpt+chitchat": [0, 1, 2, 4, 5]}
    one_chitchat = curves.split_shards(["sharegpt", "chitchat", "sharegpt"], heldout_shards=1)
    assert one_chitchat["heldout"] == {"sharegpt": [2]}  # a single chit-chat shard is trained on, not held out
    assert one_chitchat["train"]["sharegpt+chitchat"] == [0, 1]


def test_too_few_sharegpt_shards_are_refused_with_the_way_out(curves):
    with pytest.raises(SystemExit, match="campaign --regenerate"):
        curves.split_shards(["sharegpt", "chitchat", "chitchat"], heldout_shards=1)
    with pytest.raises(SystemExit, match="at least 1"):
        curves.split_shards(["sharegpt"] * 3, heldout_shards=0)


def test_shard_ranges_are_written_compactly(curves):
    assert curves.shard_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert curves.shard_ranges([21]) == "21"
