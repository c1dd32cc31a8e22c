"""Prompt-lookup proposals inside the DFlash loop: a row's drafts may be an n-gram continuation copied from its
own sequence instead of the drafter's block, whichever is expected to bring more tokens per second.

A proposal is found as prompt-lookup decoding finds it: the last ``n`` tokens of the row (the pending token
included) are searched for earlier in the row, for ``n`` from ``max_ngram`` down to 1, and the tokens that
followed the latest earlier match are proposed, up to ``num_tokens`` of them. The target verifies a proposal by the
same greedy rule as the drafter's, so the output never depends on which proposal a step took.

Which one a step takes is chosen from what each is expected to commit: the drafter's per-slot acceptance
(``AcceptanceProfile``, the one ``num_speculative_tokens = "auto"`` keeps) and a profile per n-gram size for the
lookups, both counted online and kept on the drafter across calls. Where the loop knows what verifying n rows
costs (``VerifyCosts``), it also weighs the drafter's forward: when every row is expected to do better with its
lookup, or the drafter is not worth its cost this step, the drafter forward is skipped and its context waits for
the next step that drafts. Greedy decoding only: a copied proposal has no draft distribution for sampling.

This module is part of the portable core: it imports only torch and its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .schedule_dflash import AcceptanceProfile, DraftSchedule, VerifyCosts

DEFAULT_MAX_NGRAM = 3  # the longest suffix matched (transformers' prompt lookup defaults to 2)


def check_prompt_lookup(num_tokens: Any, max_ngram: Any, tokens_name: str, ngram_name: str) -> None:
    """Prompt-lookup settings: a positive number of tokens (or None: off) and a positive n-gram size."""
    if num_tokens is not None and not (isinstance(num_tokens, int) and not isinstance(num_tokens, bool)
                                       and num_tokens >= 1):
        raise ValueError(f"{tokens_name} must be a positive int (tokens a lookup may propose per step) or None "
                         f"(no lookup), got {num_tokens!r}.")
    if not (isinstance(max_ngram, int) and not isinstance(max_ngram, bool) and max_ngram >= 1):
        raise ValueError(f"{ngram_name} must be a positive int (the longest suffix matched), got {max_ngram!r}.")


def lookup_for_call(drafter: torch.nn.Module, options: Any, generation_config: Any,
                    schedule: DraftSchedule | None) -> "LookupChooser | None":
    """Prompt lookup for one generate call: ``generate(prompt_lookup_num_tokens=…, max_matching_ngram_size=…)``
    where given, else the drafter's ``prompt_lookup_num_tokens`` / ``prompt_lookup_max_ngram`` (``options``, a
    ``DFlashOptions``); None when neither asks for it."""
    num_tokens = getattr(generation_config, "prompt_lookup_num_tokens", None)
    max_ngram = getattr(generation_config, "max_matching_ngram_size", None)
    if num_tokens is None:
        num_tokens = options.prompt_lookup_num_tokens
    if max_ngram is None:
        max_ngram = options.prompt_lookup_max_ngram
    check_prompt_lookup(num_tokens, max_ngram, "prompt_lookup_num_tokens", "max_matching_ngram_size")
    if num_tokens is None:
        return None
    if generation_config.do_sample:
        raise ValueError(
            "Prompt lookup in the DFlash loop works with greedy decoding only: a copied n-gram has no draft "
            "distribution to sample against. Drop prompt_lookup_num_tokens (or set drafter.prompt_lookup_num_tokens "
            "= None) for do_sample=True."
        )
    return LookupChooser(drafter, num_tokens, max_ngram, options.max_drafts, schedule)


def ngram_continuation(sequence: torch.Tensor, max_ngram: int, num_tokens: int) -> tuple[torch.Tensor, int]:
    """The tokens that followed the latest earlier occurrence of ``sequence``'s last n tokens, for the largest n
    (``max_ngram`` … 1) that occurs earlier, at most ``num_tokens`` of them, and that n.

    sequence: [L] token ids. Returns ([k] ids, n), k ≤ num_tokens; ([0], 0) when no suffix occurs earlier.
    """
    length = sequence.shape[0]
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = sequence[: length - 1].unfold(0, n, 1)  # [L-n, n]: every earlier n-gram that has a follower
        hits = (windows == sequence[length - n :]).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n  # the latest match: recent text repeats most
            return sequence[start : start + num_tokens], n
    return sequence[:0], 0


@dataclass
class StepProposals:
    """What one step verifies. ``run_drafter``: the drafter forward runs (every row's context is consumed);
    ``lookup[i]``: live row i verifies its lookup proposal ``tokens[i]`` (matched on an ``ngram[i]``-gram)."""

    run_drafter: bool
    lookup: list[bool]
    tokens: list[torch.Tensor]
    ngram: list[int]

    def merged(self, drafts: torch.Tensor, num_drafts: torch.Tensor,
               next_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's drafts [R, n] and counts [R] once the rows that take their lookup have it in place of the
        drafter's ``drafts`` [R, m] (the other rows keep theirs and ``num_drafts``; slots a row does not verify hold
        its pending token ``next_token`` [R])."""
        width = max([drafts.shape[1]] + [t.numel() for t, use in zip(self.tokens, self.lookup) if use])
        merged = next_token[:, None].expand(-1, width).clone()  # [R, width]
        merged[:, : drafts.shape[1]] = drafts
        counts = num_drafts.clone()
        for i, (use, tokens) in enumerate(zip(self.lookup, self.tokens)):
            if use:
                merged[i, : tokens.numel()] = tokens.to(merged.device)
                counts[i] = tokens.numel()
        return merged, counts


class LookupChooser:
    """Finds each live row's lookup proposal and decides, per step, who drafts (see the module docstring)."""

    def __init__(self, drafter: torch.nn.Module, num_tokens: int, max_ngram: int, max_drafts: int,
                 schedule: DraftSchedule | None) -> None:
        self.num_tokens, self.max_ngram, self.schedule = num_tokens, max_ngram, schedule
        if schedule is not None:
            self.drafter_profile = schedule.profile
        else:  # a fixed number of drafts: the drafter's acceptance is still counted, for the choice
            profile = getattr(drafter, "acceptance_profile", None)
            if not isinstance(profile, AcceptanceProfile) or profile.slots != max_drafts:
                profile = drafter.acceptance_profile = AcceptanceProfile(max_drafts)
            self.drafter_profile = profile
        profiles = getattr(drafter, "lookup_acceptance_profiles", None)
        if not isinstance(profiles, dict) or any(p.slots != num_tokens for p in profiles.values()):
            profiles = drafter.lookup_acceptance_profiles = {}
        self.profiles: dict[int, AcceptanceProfile] = profiles  # per matched n-gram size, kept on the drafter

    def _profile(self, ngram: int) -> AcceptanceProfile:
        if ngram not in self.profiles:
            self.profiles[ngram] = AcceptanceProfile(self.num_tokens)
        return self.profiles[ngram]

    def propose(self, sequences: list[torch.Tensor], room: list[int], drafter_drafts: int) -> StepProposals:
        """sequences: each live row's ids so far [L] (its pending token last); room: drafts each row may verify
        before its length limit; drafter_drafts: what the drafter would verify this step (0: a plain step)."""
        found = [ngram_continuation(seq, self.max_ngram, min(self.num_tokens, r)) if r > 0 else (seq[:0], 0)
                 for seq, r in zip(sequences, room)]
        ngram = [n for _, n in found]
        tokens = [self._worth_verifying(t, n, len(found)) for t, n in found]
        gains = [self._profile(n).expected_tokens(t.numel()) if n else 1.0 for t, n in zip(tokens, ngram)]
        if drafter_drafts == 0:  # the drafter is not worth a step now: lookup where it beats a plain step
            use = [g > 1.0 for g in gains]
            if self.schedule is not None and any(use):
                use = use if self._rate(gains, tokens, use, drafter=False) > self._plain_rate(len(gains)) else \
                    [False] * len(use)
            return StepProposals(False, use, tokens, ngram)
        drafter_gain = self.drafter_profile.expected_tokens(drafter_drafts)
        prefer = [g > drafter_gain for g in gains]
        if all(prefer):
            return StepProposals(False, prefer, tokens, ngram)
        if self.schedule is None or not any(g > 1.0 for g in gains):
            return StepProposals(True, prefer, tokens, ngram)
        # With costs: a step of lookups alone (no drafter forward) against one where the drafter runs.
        alone = [g > 1.0 for g in gains]
        mixed = self._rate([max(g, drafter_gain) for g in gains], tokens, prefer, drafter=True,
                           drafter_drafts=drafter_drafts)
        if self._rate(gains, tokens, alone, drafter=False) > mixed:
            return StepProposals(False, alone, tokens, ngram)
        return StepProposals(True, prefer, tokens, ngram)

    def _worth_verifying(self, tokens: torch.Tensor, ngram: int, rows: int) -> torch.Tensor:
        """The prefix of a lookup proposal with the most expected tokens per second of verification, where the loop
        knows what rows cost: where each verified row is dear (float32 on some CPUs), the later tokens of a long
        continuation are cut once they stop paying for their rows. Without costs, the whole proposal."""
        if self.schedule is None or ngram == 0 or tokens.numel() <= 1:
            return tokens
        profile, costs = self._profile(ngram), self.schedule.costs
        best = max(range(1, tokens.numel() + 1),
                   key=lambda n: profile.expected_tokens(n) / costs.at(rows * (n + 1)))  # ties: the shorter
        return tokens[:best]

    def _rate(self, gains: list[float], tokens: list[torch.Tensor], use: list[bool], drafter: bool,
              drafter_drafts: int = 0) -> float:
        """Expected tokens per (table) second of a step whose rows commit ``gains`` on average."""
        costs: VerifyCosts = self.schedule.costs
        width = max([t.numel() for t, u in zip(tokens, use) if u] + [drafter_drafts if drafter else 0])
        seconds = costs.at(len(gains) * (width + 1))
        if drafter:
            seconds += (self.schedule.draft_s or 0.0) / self.schedule.scale
        return sum(gains) / seconds

    def _plain_rate(self, rows: int) -> float:
        return rows / self.schedule.costs.at(rows)

    def observe(self, proposals: StepProposals, accepted: list[int], drafter_drafts: list[int]) -> None:
        """What each row took: ``accepted[i]`` of its verified drafts (``drafter_drafts[i]`` where it took the
        drafter's). The drafter's rows feed its profile here only when no schedule does."""
        for i, a in enumerate(accepted):
            if proposals.lookup[i]:
                self._profile(proposals.ngram[i]).observe(a, proposals.tokens[i].numel())
            elif self.schedule is None and proposals.run_drafter and drafter_drafts[i]:
                self.drafter_profile.observe(a, drafter_drafts[i])


__all__ = ["DEFAULT_MAX_NGRAM", "LookupChooser", "StepProposals", "check_prompt_lookup", "lookup_for_call",
           "ngram_continuation"]
