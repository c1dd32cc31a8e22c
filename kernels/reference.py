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


def _gumbel_argmax_rows(logits: torch.Tensor, key: int, positions: torch.Tensor) -> torch.Tensor:
    """argmax(logits[r, t] + gumbel(key, positions[r] + t, v)) -> [R, T] int64 (first index on ties)."""
    R, T, V = logits.shape
    out = torch.empty(R, T, dtype=torch.int64, device=logits.device)
    vocab = torch.arange(V, device=logits.device)
    slots = torch.arange(T, device=logits.device)
    for r in range(R):
        pos = positions[r].to(torch.int64) + slots  # [T]
        noise = keyed_gumbel(key, pos[:, None], vocab[None, :])  # [T, V]
        out[r] = (logits[r].float() + noise).argmax(dim=-1)
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
    key_accept = stream_key(seed, STREAM_ACCEPT)
    key_residual = stream_key(seed, STREAM_RESIDUAL)
    key_target = stream_key(seed, STREAM_TARGET)
    vocab = torch.arange(V, device=device)
    num_accepted = torch.empty(R, dtype=torch.int64, device=device)
    next_token = torch.empty(R, dtype=torch.int64, device=device)

    for r in range(R):
        n = int(nd[r])
        pos0 = int(positions[r])
        accepted = 0
        mp = sp = mq = sq = None
        if n > 0:
            lt = target_logits[r, :n].float()  # [n, V]
            dl = draft_logits[r, :n].float()  # [n, V]
            mp, sp = _log_softmax_parts(lt)  # [n, 1] each
            mq, sq = _log_softmax_parts(dl)
            x = draft_tokens[r, :n].to(device=device, dtype=torch.int64).clamp(0, V - 1)[:, None]  # [n, 1]
            p_x = torch.exp(lt.gather(1, x) - mp) / sp  # [n, 1]
            q_x = torch.exp(dl.gather(1, x) - mq) / sq
            u = keyed_uniform(key_accept, pos0 + torch.arange(n, device=device), torch.zeros(n, dtype=torch.int64, device=device))
            accept = (u[:, None] * q_x < p_x).squeeze(1)  # [n]
            accepted = int(accept.to(torch.int64).cumprod(0).sum())
        t = accepted
        pos = torch.tensor([pos0 + t], device=device)
        row = target_logits[r, t].float()  # [V]
        if t < n:
            # First rejection at slot t: sample the normalised residual max(p - q, 0) without normalising it.
            g = keyed_gumbel(key_residual, pos, vocab)
            resid = torch.exp(row - mp[t]) / sp[t] - torch.exp(draft_logits[r, t].float() - mq[t]) / sq[t]
            scores = torch.log(resid.clamp(min=0.0)) + g
            if torch.isneginf(scores.max()):
                scores = row + g  # residual is all zero (p == q up to rounding): p itself is the right law
        else:
            scores = row + keyed_gumbel(key_target, pos, vocab)
        num_accepted[r] = accepted
        next_token[r] = scores.argmax()
    return num_accepted, next_token
