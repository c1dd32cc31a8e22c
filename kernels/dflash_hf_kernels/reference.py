"""Pure-torch reference for fused verification: the CPU path, and the oracle the Triton kernels are tested against.

Shapes (R requests, T = D + 1 block slots, V vocabulary):
    target_logits  [R, T, V]    any float dtype; ALREADY processed (temperature, top-k/top-p, ... applied
                                upstream; filtered tokens are -inf). Verification treats softmax(logits) as p.
    draft_logits   [R, T-1, V]  (ratio mode) the drafter's processed logits; q = softmax(draft_logits).
    draft_tokens   [R, T-1]     int64; slot t holds the draft proposed for block slot t.
    num_drafts     [R]          int64; row r has num_drafts[r] <= T-1 valid drafts (ragged rows; larger values
                                are clamped to T-1, negative ones to 0).
    positions      [R]          int64; absolute sequence position of slot 0. Slot t uses positions[r] + t.
Every verifier returns ``(num_accepted [R] int64, next_token [R] int64)``: num_accepted drafts are committed,
followed by next_token (the correction at the first rejection, or the bonus when every draft is accepted).

All math is fp32. Rows are processed one at a time so the reference never holds more than one [T, V] noise
tensor; it is a reference, not a fast path for large batches.
"""

from __future__ import annotations

import torch

from .keyed_random import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    STREAM_TARGET,
    keyed_gumbel,
    keyed_uniform,
    stream_key,
)

__all__ = ["greedy_verify", "strict_verify", "ratio_verify", "sample_keyed"]


def _check(target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return num_drafts clamped to [0, T-1] (int64, on the logits' device)."""
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [R, T, V], got {tuple(target_logits.shape)}")
    R, T, _ = target_logits.shape
    if tuple(draft_tokens.shape) != (R, T - 1):
        raise ValueError(f"draft_tokens must be [R, T-1] = {(R, T - 1)}, got {tuple(draft_tokens.shape)}")
    if tuple(num_drafts.shape) != (R,):
        raise ValueError(f"num_drafts must be [R] = {(R,)}, got {tuple(num_drafts.shape)}")
    return num_drafts.to(device=target_logits.device, dtype=torch.int64).clamp(0, T - 1)


def _walk(samples: torch.Tensor, draft_tokens: torch.Tensor, nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept while draft == sample for t < nd. samples [R, T], draft_tokens [R, T-1], nd [R]."""
    R, T = samples.shape
    t = torch.arange(T - 1, device=samples.device)
    match = (draft_tokens.to(torch.int64) == samples[:, : T - 1]) & (t[None, :] < nd[:, None])
    # The number of leading matches: cumprod stays 1 exactly over the accepted prefix.
    num_accepted = match.to(torch.int64).cumprod(dim=1).sum(dim=1)
    next_token = samples.gather(1, num_accepted[:, None]).squeeze(1)
    return num_accepted, next_token


# Rows are processed in chunks of about this many [.., V] elements, bounding the int64 hash temporaries (~32 MB each).
_CHUNK_ELEMS = 1 << 22


def _row_chunks(R: int, per_row: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // max(per_row, 1))
    return [slice(i, min(i + step, R)) for i in range(0, R, step)]


def _gumbel_argmax_rows(logits: torch.Tensor, key: int, positions: torch.Tensor) -> torch.Tensor:
    """argmax(logits[r, t] + gumbel(key, positions[r] + t, v)) -> [R, T] int64 (first index on ties)."""
    R, T, V = logits.shape
    device = logits.device
    out = torch.empty(R, T, dtype=torch.int64, device=device)
    vocab = torch.arange(V, device=device)
    slots = torch.arange(T, device=device)
    positions = positions.to(device=device, dtype=torch.int64)
    for rows in _row_chunks(R, T * V):
        pos = positions[rows, None] + slots  # [r, T]
        noise = keyed_gumbel(key, pos[..., None], vocab)  # [r, T, V]
        out[rows] = (logits[rows].float() + noise).argmax(dim=-1)
    return out


def greedy_verify(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept while draft[t] == argmax(target_logits[t]); next_token = argmax at slot num_accepted."""
    nd = _check(target_logits, draft_tokens, num_drafts)
    # argmax returns the first maximal index, the tie rule the kernels reproduce. bf16 -> fp32 is exact.
    samples = target_logits.float().argmax(dim=-1)  # [R, T]
    return _walk(samples, draft_tokens, nd)


def strict_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the target at every slot (keyed Gumbel-argmax, STREAM_TARGET); accept while sample == draft."""
    nd = _check(target_logits, draft_tokens, num_drafts)
    samples = _gumbel_argmax_rows(target_logits, stream_key(seed, STREAM_TARGET), positions)
    return _walk(samples, draft_tokens, nd)


def sample_keyed(
    logits: torch.Tensor, seed: int, positions: torch.Tensor, stream: int = STREAM_DRAFT
) -> torch.Tensor:
    """Keyed Gumbel-argmax sample of softmax(logits[r, t]) at position positions[r] + t -> [R, T] int64."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [R, T, V], got {tuple(logits.shape)}")
    return _gumbel_argmax_rows(logits, stream_key(seed, stream), positions)


def _log_softmax_parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum(exp(x - max))) over the last dim, fp32, with p = exp(x - max) / sum (the kernels' formula)."""
    x = logits.float()
    m = x.amax(dim=-1, keepdim=True)
    s = torch.exp(x - m).sum(dim=-1, keepdim=True)
    return m, s


def ratio_verify(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al.): accept draft x_t with probability min(1, p(x_t) / q(x_t)).

    The coin for slot t is u(seed, pos + t, 0, STREAM_ACCEPT); accept iff u * q(x) < p(x). At the first rejection
    the correction is a keyed Gumbel-argmax over log(max(p - q, 0)) (STREAM_RESIDUAL), falling back to p itself if
    the residual is numerically all zero; if every draft is accepted the bonus is a keyed sample of p at slot
    num_drafts (STREAM_TARGET, the same noise strict mode and plain keyed sampling use).
    """
    nd = _check(target_logits, draft_tokens, num_drafts)
    R, T, V = target_logits.shape
    if tuple(draft_logits.shape) != (R, T - 1, V):
        raise ValueError(f"draft_logits must be [R, T-1, V] = {(R, T - 1, V)}, got {tuple(draft_logits.shape)}")
    device = target_logits.device
    keys = (stream_key(seed, STREAM_ACCEPT), stream_key(seed, STREAM_RESIDUAL), stream_key(seed, STREAM_TARGET))
    positions = positions.to(device=device, dtype=torch.int64)
    draft_tokens = draft_tokens.to(device=device, dtype=torch.int64)
    num_accepted = torch.empty(R, dtype=torch.int64, device=device)
    next_token = torch.empty(R, dtype=torch.int64, device=device)
    for rows in _row_chunks(R, 2 * T * V):
        num_accepted[rows], next_token[rows] = _ratio_rows(
            target_logits[rows], draft_logits[rows].to(device), draft_tokens[rows], nd[rows], positions[rows], keys
        )
    return num_accepted, next_token


def _ratio_rows(
    target_logits: torch.Tensor,  # [r, T, V]
    draft_logits: torch.Tensor,  # [r, D, V], D = T - 1
    draft_tokens: torch.Tensor,  # [r, D] int64
    nd: torch.Tensor,  # [r] int64, clamped to [0, D]
    positions: torch.Tensor,  # [r] int64
    keys: tuple[int, int, int],  # stream keys: accept, residual, target
) -> tuple[torch.Tensor, torch.Tensor]:
    key_accept, key_residual, key_target = keys
    R, T, V = target_logits.shape
    D = T - 1
    device = target_logits.device
    rows = torch.arange(R, device=device)
    num_accepted = torch.zeros(R, dtype=torch.int64, device=device)
    if D > 0:
        # 1. Accept coins on every draft slot: p(x) / q(x) from the two softmax normalisers.
        lt = target_logits[:, :D].float()  # [r, D, V]
        ld = draft_logits.float()  # [r, D, V]
        mp, sp = _log_softmax_parts(lt)  # [r, D, 1] each
        mq, sq = _log_softmax_parts(ld)
        x = draft_tokens.clamp(0, V - 1)[..., None]  # [r, D, 1]
        p_x = (torch.exp(lt.gather(-1, x) - mp) / sp).squeeze(-1)  # [r, D]
        q_x = (torch.exp(ld.gather(-1, x) - mq) / sq).squeeze(-1)
        slots = torch.arange(D, device=device)
        u = keyed_uniform(key_accept, positions[:, None] + slots, torch.zeros_like(slots))  # [r, D]
        accept = (u * q_x < p_x) & (slots < nd[:, None])
        num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)
    rejected = num_accepted < nd  # [r]

    # 2. One row per request: the first rejected slot (residual) or slot nd (bonus from p).
    vocab = torch.arange(V, device=device)
    row = target_logits[rows, num_accepted].float()  # [r, V]
    pos = (positions + num_accepted)[:, None]  # [r, 1]
    scores = row + keyed_gumbel(key_target, pos, vocab)  # bonus candidates
    if bool(rejected.any()):
        t = num_accepted.clamp(max=D - 1)  # valid index on rejected rows; others are discarded below
        g = keyed_gumbel(key_residual, pos, vocab)
        resid = torch.exp(row - mp[rows, t]) / sp[rows, t] - torch.exp(ld[rows, t] - mq[rows, t]) / sq[rows, t]
        res_scores = torch.log(resid.clamp(min=0.0)) + g
        # Residual numerically all zero (p == q up to rounding): p itself is the right law.
        empty = torch.isneginf(res_scores.amax(dim=-1, keepdim=True))
        res_scores = torch.where(empty, row + g, res_scores)
        scores = torch.where(rejected[:, None], res_scores, scores)
    return num_accepted, scores.argmax(dim=-1)
