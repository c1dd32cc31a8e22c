"""Verification: generate's logits processors applied to block slots, and the acceptance rule.

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.

Every function here takes batched tensors, R rows (1 for a single prompt):
- ``BatchProcessorView.block_scores``: target logits [R, n+1, V] -> processed scores, slot t of a row scored
  with that row's sequence + its first t drafts, as plain ``generate`` would have scored that token;
- ``BlockVerifier.verify``: scores [R, n+1, V] + drafts [R, n] -> accepted drafts [R] and the next token [R];
- ``BlockVerifier.sample_drafts`` (ratio sampling): the drafter's processed q [R, n, V] -> drafts [R, n].
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

SAMPLING_MODES = ("auto", "strict", "ratio")


def _kernel_module() -> Any:
    """dflash_hf's fused kernels when the package is installed (never required by published drafters)."""
    try:
        return importlib.import_module("dflash_hf.kernels")
    except ImportError:
        return None


class BatchProcessorView:
    """Runs generate's logits processors for the rows of a DFlash batch as plain batched ``generate`` runs them.

    Plain ``generate`` calls every processor on the whole batch, ``input_ids`` [N, L] with row ``b`` at index
    ``b``; processors may depend on that index (``prefix_allowed_tokens_fn(batch_id, …)``) or hold one entry per
    row (repetition penalty's per-row prompt length). DFlash rows advance by different amounts, so one call
    cannot hold every row at its own length. Instead each call holds all N rows at ONE length ℓ: the rows being
    scored at ℓ carry their real prefix, every other row a stand-in of that length (its own sequence cut to ℓ,
    or right-padded with the pad token as plain ``generate`` pads a finished row); the stand-ins' outputs are
    discarded. A call therefore scores every row whose block covers position ℓ at once. With one row this is
    exactly one processor call per slot on that row's own sequence.
    """

    def __init__(self, logits_processor: Any, num_rows: int, pad_token: Any) -> None:
        self.logits_processor = logits_processor
        self.num_rows = num_rows
        self.pad_token = 0 if pad_token is None else int(pad_token)

    def __bool__(self) -> bool:
        return bool(self.logits_processor)

    def block_scores(
        self, logits: torch.Tensor, rows: list[int], sequences: list[torch.Tensor], drafts: torch.Tensor
    ) -> torch.Tensor:
        """logits [R, n+1, V] of live rows ``rows`` (their batch indices); ``sequences``: every batch row's ids
        [L_b]; drafts [R, n]. Returns fp32 scores [R, n+1, V]."""
        if not self:
            return logits.float()
        requests = [
            (r, torch.cat((sequences[r], drafts[i, :t])), logits[i, t])
            for i, r in enumerate(rows) for t in range(logits.shape[1])
        ]
        processed = self._score(requests, self._stand_ins(rows, sequences, drafts))
        return torch.stack(processed).view(logits.shape[0], logits.shape[1], -1)

    def sampled_drafts(
        self,
        draft_logits: torch.Tensor,
        rows: list[int],
        sequences: list[torch.Tensor],
        sample: Callable[[torch.Tensor, int], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ratio sampling: the drafter's logits [R, n, V] get the processors too, slot after slot (slot t sees
        the drafts sampled before it); ``sample(scores [R, k, V], t)`` draws drafts [R, k] for slots t…t+k-1.
        Returns (drafts [R, n], the processed q [R, n, V] they were drawn from)."""
        if not self or draft_logits.shape[1] == 0:
            draft_scores = draft_logits.float()
            return sample(draft_scores, 0), draft_scores
        drafts = draft_logits.new_zeros(draft_logits.shape[:2], dtype=torch.long)
        slots = []
        for t in range(draft_logits.shape[1]):
            requests = [(r, torch.cat((sequences[r], drafts[i, :t])), draft_logits[i, t]) for i, r in enumerate(rows)]
            slot = torch.stack(self._score(requests, self._stand_ins(rows, sequences, drafts[:, :t])))  # [R, V]
            drafts[:, t] = sample(slot[:, None], t)[:, 0]
            slots.append(slot)
        return drafts, torch.stack(slots, dim=1)

    def _stand_ins(self, rows: list[int], sequences: list[torch.Tensor], drafts: torch.Tensor) -> list[torch.Tensor]:
        """Each batch row's longest known ids: its sequence, and for a live row its drafts after it."""
        known = list(sequences)
        for i, r in enumerate(rows):
            known[r] = torch.cat((known[r], drafts[i]))
        return known

    def _score(self, requests: list[tuple[int, torch.Tensor, torch.Tensor]], stand_ins: list[torch.Tensor]) -> list:
        """requests: (batch row, prefix [ℓ], scores [V]). Returns the processed fp32 scores [V] of each."""
        by_length: dict[int, list[int]] = {}
        for k, (_, prefix, _) in enumerate(requests):
            by_length.setdefault(prefix.shape[0], []).append(k)
        out: list = [None] * len(requests)
        vocab = requests[0][2].shape[-1]
        for length, members in by_length.items():
            ids = torch.stack([self._cut_or_pad(row, length) for row in stand_ins])  # [N, ℓ]
            scores = requests[0][2].new_zeros(self.num_rows, vocab, dtype=torch.float32)
            for k in members:
                row, prefix, row_scores = requests[k]
                ids[row] = prefix
                scores[row] = row_scores.float()
            processed = self.logits_processor(ids, scores)
            for k in members:
                out[k] = processed[requests[k][0]]
        return out

    def _cut_or_pad(self, row_ids: torch.Tensor, length: int) -> torch.Tensor:
        if row_ids.shape[0] >= length:
            return row_ids[:length]
        return torch.cat((row_ids, row_ids.new_full((length - row_ids.shape[0],), self.pad_token)))


def _verify_portable(scores: torch.Tensor, drafts: torch.Tensor, do_sample: bool) -> tuple[int, torch.Tensor]:
    """Greedy or strict-sampling verification of one row with plain torch ops (the path of published drafters
    when ``dflash_hf`` is not installed). scores: [1, n+1, V]; drafts: [1, n].

    Strict sampling draws every slot from the target (with the same global RNG as plain ``generate``) and
    accepts while the draw equals the draft, so each committed token is an exact sample of the target.
    """
    if do_sample:
        picks = torch.multinomial(torch.softmax(scores[0], dim=-1), num_samples=1).squeeze(-1)
    else:
        picks = scores[0].argmax(dim=-1)
    n = drafts.shape[1]
    accepted = int((picks[:n] == drafts[0]).int().cumprod(0).sum()) if n else 0
    return accepted, picks[accepted : accepted + 1]


class BlockVerifier:
    """Decides, per verify step, how many drafts the target accepts and which token it commits next.

    Modes: ``greedy``; ``strict`` (sample the target at each slot, accept while equal to the draft); ``ratio``
    (drafts sampled from the drafter's q, accepted with probability min(1, p/q), residual resampling).
    With ``dflash_hf`` installed the fused kernels run (Triton on CUDA, their torch reference elsewhere) with
    randomness keyed by (seed, position, token) — the seed is drawn once from torch's global RNG, so
    ``torch.manual_seed`` makes runs reproducible and a row samples the same whatever it is batched with.
    Without it, greedy and strict run on plain torch ops, drawing from the global RNG row after row.
    """

    def __init__(self, do_sample: bool, sampling_mode: str, device: torch.device) -> None:
        if sampling_mode not in SAMPLING_MODES:
            raise ValueError(f"drafter.sampling_mode must be 'auto', 'strict' or 'ratio', got {sampling_mode!r}.")
        self.kernels = _kernel_module()
        if sampling_mode == "auto":  # ratio accepts more (measured on the default pair) but needs the kernels
            sampling_mode = "ratio" if self.kernels is not None else "strict"
        self.mode = "greedy" if not do_sample else sampling_mode
        if self.mode == "ratio" and self.kernels is None:
            raise ValueError("sampling_mode='ratio' needs the dflash_hf package (pip install dflash-hf).")
        self.backend = "torch" if self.kernels is None else self.kernels.select_backend(device)
        self.seed = int(torch.randint(0, 2**31 - 1, (1,))) if do_sample and self.kernels is not None else None

    @property
    def samples_drafts(self) -> bool:
        return self.mode == "ratio"

    def sample_drafts(self, draft_scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Ratio mode: drafts [R, n] from the drafter's processed scores [R, n, V]; row r's slot t is keyed by
        position ``positions[r] + t``."""
        return self.kernels.sample_keyed(draft_scores, self.seed, positions, backend=self.backend)

    def verify(
        self,
        scores: torch.Tensor,
        drafts: torch.Tensor,
        num_drafts: torch.Tensor,
        positions: torch.Tensor,
        draft_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """scores: [R, n+1, V] processed target scores; drafts: [R, n]; row r verifies only its first
        ``num_drafts[r]`` drafts; ``positions`` [R]: the position (real tokens before it) slot 0 decides;
        ``draft_scores`` [R, n, V]: ratio mode's q. Returns (accepted drafts [R], next token [R])."""
        if self.kernels is None:
            results = [
                _verify_portable(scores[r : r + 1, : n + 1], drafts[r : r + 1, :n], self.mode != "greedy")
                for r, n in enumerate(num_drafts.tolist())
            ]
            accepted = torch.tensor([a for a, _ in results], device=scores.device)
            return accepted, torch.cat([token for _, token in results])
        if self.mode == "ratio" and draft_scores is None:  # the prefill: no drafts, q is never read
            draft_scores = scores[:, :0]
        accepted, next_token, _ = self.kernels.verify(
            self.mode, scores, drafts, num_drafts.to(scores.device), draft_logits=draft_scores, seed=self.seed,
            positions=positions.to(scores.device), backend=self.backend,
        )
        return accepted, next_token.view(-1)
