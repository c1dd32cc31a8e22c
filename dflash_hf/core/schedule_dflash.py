"""How many drafts to verify at each step, chosen by what they cost on this machine and what they bring.

A step that verifies n drafts costs one drafter forward plus one target forward over n + 1 rows, and brings
``1 + sum_{k<=n} prod_{j<=k} c_j`` tokens on average, ``c_j`` being the chance that draft j is accepted once
drafts 1 … j-1 were. What n + 1 rows cost depends on the CPU and the dtype far more than on anything a rule could
know (on an AMX Xeon in bfloat16, 16 rows cost 1.2x one row; in float32, 4 rows already cost 1.6x), so it is
measured once per machine and target (``VerifyCosts``, filled by the tools from their calibration cache) and
rescaled online by what the steps actually take. The acceptance rates ``c_j`` are counted online, per slot, on
top of a prior, in an ``AcceptanceProfile`` the drafter keeps across calls.

Each step takes the n with the most expected tokens per second. When even the best n is expected to be slower
than plain decoding (one row per token), the loop decodes plainly and drafts only every ``PROBE_EVERY``-th step,
so that the profile keeps up if acceptance rises. The choice never changes the tokens: each step's verification
is the same exact rule whatever n it verified.

This module is part of the portable core: it imports only torch and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PROBE_EVERY = 16  # while plain decoding is expected to be faster: draft on one step in this many
PRIOR_ACCEPTANCE = 0.5  # the prior chance that a draft is accepted after an accepted one, …
PRIOR_WEIGHT = 4.0  # … worth this many observations of each slot
COST_SMOOTHING = 0.2  # weight of each new step's timing in the running estimates


@dataclass
class VerifyCosts:
    """Seconds of one target forward over ``rows`` new positions (1 = a plain decoding step), measured on this
    machine for this target and dtype; rows between measured counts are interpolated linearly."""

    seconds: dict[int, float]

    def __post_init__(self) -> None:
        bad = {r: s for r, s in self.seconds.items() if not (isinstance(r, int) and r >= 1 and s > 0
                                                             and math.isfinite(s))}
        if bad or 1 not in self.seconds:
            raise ValueError(f"VerifyCosts needs positive seconds for rows >= 1, one row included; got {self.seconds}")
        self._rows = sorted(self.seconds)

    def at(self, rows: int) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        if rows > self._rows[-1]:  # past the last measurement: the slope of the last two
            if len(self._rows) == 1:
                return self.seconds[self._rows[0]] * rows
            a, b = self._rows[-2], self._rows[-1]
            return self.seconds[b] + (rows - b) * (self.seconds[b] - self.seconds[a]) / (b - a)
        b = next(r for r in self._rows if r > rows)
        a = max(r for r in self._rows if r < rows)
        return self.seconds[a] + (rows - a) * (self.seconds[b] - self.seconds[a]) / (b - a)


@dataclass
class AcceptanceProfile:
    """Per draft slot j (0-based): how often it was verified with every earlier draft accepted (``reached``) and
    how often it was then accepted (``hits``), on top of a prior of ``PRIOR_WEIGHT`` observations at
    ``PRIOR_ACCEPTANCE``. Kept on the drafter (``drafter.acceptance_profile``) so that each call starts from what
    the earlier ones saw."""

    slots: int
    reached: list[float] = field(default_factory=list)
    hits: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reached = self.reached or [0.0] * self.slots
        self.hits = self.hits or [0.0] * self.slots

    def observe(self, accepted: int, verified: int) -> None:
        """One row's step: ``accepted`` of its ``verified`` drafts were taken (the leading run)."""
        for j in range(min(accepted + 1, verified)):
            self.reached[j] += 1
            self.hits[j] += j < accepted

    def rates(self) -> list[float]:
        return [(h + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (r + PRIOR_WEIGHT) for h, r in zip(self.hits, self.reached)]

    def expected_tokens(self, drafts: int) -> float:
        """Tokens a step verifying ``drafts`` drafts commits on average (the target's own token included)."""
        total, run = 1.0, 1.0
        for rate in self.rates()[:drafts]:
            run *= rate
            total += run
        return total


class DraftSchedule:
    """The drafts each step verifies (0: a plain step, no drafting), from ``costs`` and ``profile``; ``observe``
    after every step with what it took."""

    def __init__(self, costs: VerifyCosts, profile: AcceptanceProfile, most: int) -> None:
        self.costs, self.profile, self.most = costs, profile, most
        self.scale = 1.0  # measured / predicted verify time: the machine's load and the cache length move it
        self.draft_s: float | None = None  # one drafter forward, measured online
        self.steps = 0
        self.plain_expected_faster = False

    def drafts(self, rows: int = 1) -> int:
        """Drafts for the next step of ``rows`` live rows (each verifies that many)."""
        best, rate = self._best(rows)
        self.plain_expected_faster = rate < rows / self.costs.at(rows)
        self.steps += 1
        if self.plain_expected_faster and self.steps % PROBE_EVERY != 1:
            return 0
        return best

    def _best(self, rows: int) -> tuple[int, float]:
        """The n in 1 … most with the most expected tokens per second over ``rows`` rows, and that rate (in the
        table's seconds: the measured draft time is rescaled by ``scale``)."""
        draft_s = (self.draft_s or 0.0) / self.scale
        rates = {n: rows * self.profile.expected_tokens(n) / (draft_s + self.costs.at(rows * (n + 1)))
                 for n in range(1, self.most + 1)}
        best = max(rates, key=rates.get)
        return best, rates[best]

    def observe(self, drafts: int, accepted: list[int], draft_s: float, verify_s: float,
                drafted: list[int] | None = None) -> None:
        """A step verified ``drafts`` drafts in each of ``len(accepted)`` rows (row i took ``accepted[i]``) in
        ``draft_s`` + ``verify_s`` seconds. ``drafted[i]``: how many of row i's drafts were the drafter's (default
        ``drafts``; 0 where the row verified a prompt lookup instead, which says nothing of the drafter); all 0:
        the drafter did not run, so ``draft_s`` is not its time."""
        drafted = [drafts] * len(accepted) if drafted is None else drafted
        for a, mine in zip(accepted, drafted):
            if mine:
                self.profile.observe(a, mine)
        ratio = verify_s / self.costs.at(len(accepted) * (drafts + 1))
        self.scale += COST_SMOOTHING * (ratio - self.scale)
        if any(drafted):
            self.draft_s = draft_s if self.draft_s is None else self.draft_s + COST_SMOOTHING * (draft_s - self.draft_s)

    def expected_speedup(self, rows: int = 1) -> float:
        """Expected tokens per second of the best n against plain decoding's, at the current estimates."""
        return self._best(rows)[1] * self.costs.at(rows) / rows


__all__ = ["AcceptanceProfile", "DraftSchedule", "PROBE_EVERY", "VerifyCosts"]
