"""Fused Triton verification kernels. Same contract as ``reference.py`` (read its docstring for the shapes).

Design (DESIGN.md §7): every logit is read once, from a grid split over (row, block slot, vocab tile) so that a
single request still fills the GPU (at V = 151936 and 4096-wide tiles, one 16-slot request is 16 × 38 = 608
programs). Per tile a program reduces to a handful of scalars in a small scratch buffer; a second, per-request
kernel merges the tiles and walks the block. No [.., V] probability tensor is ever written.

    greedy / strict   1. _tile_argmax_kernel   grid (R*T, NT): tile max + first argmax of  x          (greedy)
                                                                or of  x + gumbel(seed, pos, v) (strict)
                      2. _merge_walk_kernel    grid (R,): merge tiles -> one token per slot, accept while it
                                               equals the draft, write (num_accepted, next_token).
    ratio             1. _ratio_stats_kernel   grid (R*(T-1), NT): per-tile max and sum-exp of target AND draft
                                               logits (two softmax normalisers, nothing else).
                      2. _ratio_accept_kernel  grid (R,): merge the normalisers, gather p(x_t), q(x_t) at the draft
                                               tokens, run the accept coins, write num_accepted and the merged
                                               normalisers of the first rejected slot.
                      3. _residual_tile_kernel grid (R, NT): ONE row per request: Gumbel-argmax over
                                               log(max(p - q, 0)) at the rejected slot, or over the target logits
                                               at the bonus slot; plus the p-fallback for an all-zero residual.
                      4. _merge_tiles_kernel   grid (R,): merge the tiles into next_token.
    sample_keyed      _tile_argmax_kernel (Gumbel) + _merge_tiles_kernel over all R*T rows.

Only ``tl.exp`` / ``tl.log`` are used (no libdevice), so everything runs under ``TRITON_INTERPRET=1`` on CPU tensors,
which is how the tests exercise it. That variable must be set before triton itself is first imported (triton's own
``@jit`` library functions such as ``tl.max`` are decorated then), and importing transformers or torch._dynamo
may import triton: set it at the very start of the process. ``interpreter_active()`` tells whether it worked.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .keyed_random import STREAM_ACCEPT, STREAM_DRAFT, STREAM_RESIDUAL, STREAM_TARGET, stream_key_i32

__all__ = [
    "greedy_verify",
    "strict_verify",
    "ratio_verify",
    "sample_keyed",
    "default_block_v",
    "interpreter_active",
]

# A jit function may only read globals that are constexpr.
_INT32_MAX = tl.constexpr(2147483647)


# ---------------------------------------------------------------------------------------------------------------
# Keyed randomness (bit-identical to keyed_random.keyed_uniform: MurmurHash3 x86_32 over [position, token]).
# All hash arithmetic is uint32, which wraps, so no masking is needed here.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotl(x, r: tl.constexpr):
    return (x << r) | (x >> (32 - r))


@triton.jit
def _mix_word(h, k):
    k = k * 0xCC9E2D51
    k = _rotl(k, 15)
    k = k * 0x1B873593
    h = h ^ k
    h = _rotl(h, 13)
    return h * 5 + 0xE6546B64


@triton.jit
def _fmix(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _uniform(key, pos, tok):
    """u in [2**-24, 1 - 2**-24] (fp32). key: int32 holding the uint32 stream key; pos, tok: uint32."""
    h = _mix_word(key.to(tl.uint32, bitcast=True), pos)
    h = _mix_word(h, tok)
    h = _fmix(h ^ 8)
    # Top 23 bits -> (2k + 1) / 2**24: exact in fp32, never 0 or 1.
    return (h >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08


@triton.jit
def _gumbel(key, pos, tok):
    # Both logs must be accurate near 1 in RELATIVE terms: u close to 1 gives the largest noise (the candidates that
    # win the argmax), where -log(u) is tiny. So no lg2.approx here; tl.log lowers to an accurate polynomial.
    return -tl.log(-tl.log(_uniform(key, pos, tok)))


# ---------------------------------------------------------------------------------------------------------------
# Small reductions shared by the kernels.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _first_argmax(x, idx):
    """(max, smallest idx holding it) of a 1-D block; ties -> first index, as torch.argmax."""
    best = tl.max(x, axis=0)
    return best, tl.min(tl.where(x == best, idx, _INT32_MAX), axis=0)


@triton.jit
def _merge_first_argmax(val, idx, axis: tl.constexpr):
    """Merge per-tile (max, first index) pairs along ``axis``. Tiles cover increasing vocab ranges, so the smallest
    index among the tiles that hold the global max is the global first argmax."""
    best = tl.max(val, axis=axis)
    best_b = tl.expand_dims(best, axis)
    return best, tl.min(tl.where(val == best_b, idx, _INT32_MAX), axis=axis)


@triton.jit
def _tile_max_sumexp(x):
    """Tile max m and sum(exp(x - m)); an all -inf tile gives (-inf, 0) without producing NaN."""
    m = tl.max(x, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(tl.exp(x - m_safe), axis=0)


@triton.jit
def _merge_max_sumexp(m, s):
    """Merge per-tile (max, sum-exp) pairs along axis 1 of [BLOCK_T, BLOCK_NT] into one normaliser per slot."""
    big_m = tl.max(m, axis=1)
    big_m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    # Tiles with m = -inf carry s = 0 and exp(-inf) = 0: they add exactly nothing.
    return big_m, tl.sum(s * tl.exp(m - big_m_safe[:, None]), axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["key"])
def _tile_argmax_kernel(
    logits_ptr, stride_lr, stride_lt,  # logits [R, T, V], unit stride over V
    num_drafts_ptr,  # [R] int64; only read when RAGGED
    positions_ptr,  # [R] int64; only read when GUMBEL
    tile_val_ptr, tile_idx_ptr,  # scratch [R, T, NT] fp32 / int32
    key, T, V, NT,
    RAGGED: tl.constexpr, GUMBEL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rt = tl.program_id(0)  # = r * T + t
    tile = tl.program_id(1)
    r = rt // T
    t = rt % T
    if RAGGED:
        # Slots after num_drafts can never be committed: skip their logits entirely.
        nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + r), 0), T - 1)
        active = t <= nd
    else:
        active = t < T
    if active:
        offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        row = logits_ptr + r.to(tl.int64) * stride_lr + t.to(tl.int64) * stride_lt
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if GUMBEL:
            pos = (tl.load(positions_ptr + r) + t).to(tl.uint32)
            x = x + _gumbel(key, pos, offs.to(tl.uint32))  # -inf (filtered) stays -inf: never sampled
        best, idx = _first_argmax(x, offs)
        tl.store(tile_val_ptr + rt * NT + tile, best)
        tl.store(tile_idx_ptr + rt * NT + tile, idx)


@triton.jit
def _merge_walk_kernel(
    tile_val_ptr, tile_idx_ptr,  # [R, T, NT] from _tile_argmax_kernel
    draft_ptr, stride_dr,  # draft_tokens [R, T-1] int64, unit stride over slots
    num_drafts_ptr,  # [R] int64
    num_accepted_ptr, next_token_ptr,  # [R] int64 outputs
    T, NT,
    BLOCK_T: tl.constexpr, BLOCK_NT: tl.constexpr,
):
    r = tl.program_id(0)
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + r), 0), T - 1)
    ts = tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_NT)
    live = ts <= nd  # only these slots were computed
    m2 = live[:, None] & (ks < NT)[None, :]
    offs = (r * T + ts)[:, None] * NT + ks[None, :]  # [BLOCK_T, BLOCK_NT]
    val = tl.load(tile_val_ptr + offs, mask=m2, other=float("-inf"))
    idx = tl.load(tile_idx_ptr + offs, mask=m2, other=_INT32_MAX)
    _, tok = _merge_first_argmax(val, idx, 1)  # [BLOCK_T]: the target's token at every slot
    tok = tok.to(tl.int64)
    draft = tl.load(draft_ptr + r.to(tl.int64) * stride_dr + ts, mask=ts < nd, other=-1)
    stop = (ts >= nd) | (draft != tok)
    num_accepted = tl.min(tl.where(stop, ts, BLOCK_T), axis=0)  # first stop; <= nd since slot nd stops
    next_token = tl.sum(tl.where(ts == num_accepted, tok, 0), axis=0)
    tl.store(num_accepted_ptr + r, num_accepted.to(tl.int64))
    tl.store(next_token_ptr + r, next_token)


@triton.jit
def _merge_tiles_kernel(
    tile_val_ptr, tile_idx_ptr,  # [N, NT]
    fb_val_ptr, fb_idx_ptr,  # [N, NT] fallback candidates, only read when HAS_FALLBACK
    out_ptr,  # [N] int64
    NT,
    HAS_FALLBACK: tl.constexpr, BLOCK_NT: tl.constexpr,
):
    n = tl.program_id(0)
    ks = tl.arange(0, BLOCK_NT)
    mask = ks < NT
    val = tl.load(tile_val_ptr + n * NT + ks, mask=mask, other=float("-inf"))
    idx = tl.load(tile_idx_ptr + n * NT + ks, mask=mask, other=_INT32_MAX)
    best, tok = _merge_first_argmax(val, idx, 0)
    if HAS_FALLBACK:
        fb_val = tl.load(fb_val_ptr + n * NT + ks, mask=mask, other=float("-inf"))
        fb_idx = tl.load(fb_idx_ptr + n * NT + ks, mask=mask, other=_INT32_MAX)
        _, fb_tok = _merge_first_argmax(fb_val, fb_idx, 0)
        tok = tl.where(best == float("-inf"), fb_tok, tok)
    tl.store(out_ptr + n, tok.to(tl.int64))


@triton.jit
def _ratio_stats_kernel(
    target_ptr, stride_tr, stride_tt,  # target_logits [R, T, V]
    draft_ptr, stride_dr, stride_dt,  # draft_logits [R, T-1, V]
    num_drafts_ptr,  # [R] int64
    stats_ptr,  # scratch [R, T-1, 4, NT] fp32: (target max, target sumexp, draft max, draft sumexp) per tile
    T, V, NT,
    BLOCK_V: tl.constexpr,
):
    rd = tl.program_id(0)  # = r * (T-1) + t
    tile = tl.program_id(1)
    r = rd // (T - 1)
    t = rd % (T - 1)
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + r), 0), T - 1)
    if t < nd:  # only draft slots that get an accept test need normalisers
        offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < V
        r64 = r.to(tl.int64)
        t64 = t.to(tl.int64)
        x = tl.load(target_ptr + r64 * stride_tr + t64 * stride_tt + offs, mask=mask, other=float("-inf"))
        y = tl.load(draft_ptr + r64 * stride_dr + t64 * stride_dt + offs, mask=mask, other=float("-inf"))
        mp, sp = _tile_max_sumexp(x.to(tl.float32))
        mq, sq = _tile_max_sumexp(y.to(tl.float32))
        out = stats_ptr + rd * 4 * NT + tile
        tl.store(out, mp)
        tl.store(out + NT, sp)
        tl.store(out + 2 * NT, mq)
        tl.store(out + 3 * NT, sq)


@triton.jit(do_not_specialize=["key_accept"])
def _ratio_accept_kernel(
    target_ptr, stride_tr, stride_tt,  # target_logits [R, T, V]
    draft_ptr, stride_dr, stride_dt,  # draft_logits [R, T-1, V]
    tokens_ptr, stride_xr,  # draft_tokens [R, T-1] int64
    num_drafts_ptr, positions_ptr,  # [R] int64
    stats_ptr,  # [R, T-1, 4, NT] from _ratio_stats_kernel
    num_accepted_ptr,  # [R] int64 out
    row_stats_ptr,  # [R, 4] fp32 out: merged (Mp, Sp, Mq, Sq) at slot num_accepted
    key_accept, T, V, NT,
    BLOCK_T: tl.constexpr, BLOCK_NT: tl.constexpr,
):
    r = tl.program_id(0)
    r64 = r.to(tl.int64)
    D = T - 1
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + r), 0), D)
    ts = tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_NT)
    live = ts < nd  # slots with a draft to test
    m2 = live[:, None] & (ks < NT)[None, :]
    base = stats_ptr + (r * D + ts)[:, None] * (4 * NT) + ks[None, :]  # [BLOCK_T, BLOCK_NT]
    big_mp, big_sp = _merge_max_sumexp(
        tl.load(base, mask=m2, other=float("-inf")), tl.load(base + NT, mask=m2, other=0.0)
    )
    big_mq, big_sq = _merge_max_sumexp(
        tl.load(base + 2 * NT, mask=m2, other=float("-inf")), tl.load(base + 3 * NT, mask=m2, other=0.0)
    )
    # Neutral values on dead slots keep every later expression finite.
    big_mp = tl.where(live, big_mp, 0.0)
    big_sp = tl.where(live, big_sp, 1.0)
    big_mq = tl.where(live, big_mq, 0.0)
    big_sq = tl.where(live, big_sq, 1.0)

    x = tl.load(tokens_ptr + r64 * stride_xr + ts, mask=live, other=0)
    x = tl.minimum(tl.maximum(x, 0), V - 1)
    slot = ts.to(tl.int64)
    lt_x = tl.load(target_ptr + r64 * stride_tr + slot * stride_tt + x, mask=live, other=float("-inf"))
    ld_x = tl.load(draft_ptr + r64 * stride_dr + slot * stride_dt + x, mask=live, other=float("-inf"))
    p_x = tl.exp(lt_x.to(tl.float32) - big_mp) / big_sp
    q_x = tl.exp(ld_x.to(tl.float32) - big_mq) / big_sq
    pos = (tl.load(positions_ptr + r) + ts).to(tl.uint32)
    u = _uniform(key_accept, pos, tl.zeros_like(pos))  # token id 0: one coin per position
    accept = (u * q_x < p_x) & live  # accept with probability min(1, p/q)
    num_accepted = tl.min(tl.where(accept, BLOCK_T, ts), axis=0)  # first failing slot; == nd if all pass
    tl.store(num_accepted_ptr + r, num_accepted.to(tl.int64))
    # Normalisers of the rejected slot for the residual kernel; neutral (0, 1, 0, 1) when nothing was rejected.
    sel = ts == num_accepted
    rejected = num_accepted < nd
    tl.store(row_stats_ptr + r * 4, tl.sum(tl.where(sel, big_mp, 0.0), axis=0))
    tl.store(row_stats_ptr + r * 4 + 1, tl.where(rejected, tl.sum(tl.where(sel, big_sp, 0.0), axis=0), 1.0))
    tl.store(row_stats_ptr + r * 4 + 2, tl.sum(tl.where(sel, big_mq, 0.0), axis=0))
    tl.store(row_stats_ptr + r * 4 + 3, tl.where(rejected, tl.sum(tl.where(sel, big_sq, 0.0), axis=0), 1.0))


@triton.jit(do_not_specialize=["key_residual", "key_target"])
def _residual_tile_kernel(
    target_ptr, stride_tr, stride_tt,  # target_logits [R, T, V]
    draft_ptr, stride_dr, stride_dt,  # draft_logits [R, T-1, V]
    num_drafts_ptr, positions_ptr, num_accepted_ptr,  # [R] int64
    row_stats_ptr,  # [R, 4] fp32 from _ratio_accept_kernel
    res_val_ptr, res_idx_ptr,  # scratch [R, NT]: residual (or bonus) Gumbel-argmax per tile
    fb_val_ptr, fb_idx_ptr,  # scratch [R, NT]: Gumbel-argmax of p, used if the residual is all zero
    key_residual, key_target, T, V, NT,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0)
    tile = tl.program_id(1)
    r64 = r.to(tl.int64)
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + r), 0), T - 1)
    t = tl.load(num_accepted_ptr + r)  # the slot whose token we sample
    rejected = t < nd  # else: every draft accepted, sample the bonus from p at slot nd
    offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    lt = tl.load(target_ptr + r64 * stride_tr + t * stride_tt + offs, mask=mask, other=float("-inf"))
    lt = lt.to(tl.float32)
    # The draft row is only read on rejection (slot nd may not even exist in draft_logits). The mask is built
    # from a scalar bound rather than `mask & rejected`, which the interpreter cannot broadcast.
    draft_mask = offs < tl.where(rejected, V, 0)
    ld = tl.load(draft_ptr + r64 * stride_dr + t * stride_dt + offs, mask=draft_mask, other=float("-inf"))
    ld = ld.to(tl.float32)
    pos = (tl.load(positions_ptr + r) + t).to(tl.uint32)
    g = _gumbel(tl.where(rejected, key_residual, key_target), pos, offs.to(tl.uint32))
    big_mp = tl.load(row_stats_ptr + r * 4)
    big_sp = tl.load(row_stats_ptr + r * 4 + 1)
    big_mq = tl.load(row_stats_ptr + r * 4 + 2)
    big_sq = tl.load(row_stats_ptr + r * 4 + 3)
    # Unnormalised sampling of max(p - q, 0): Gumbel-argmax of its log; zero mass -> -inf -> never chosen.
    resid = tl.exp(lt - big_mp) / big_sp - tl.exp(ld - big_mq) / big_sq
    score = tl.where(rejected, tl.log(tl.maximum(resid, 0.0)) + g, lt + g)
    best, idx = _first_argmax(score, offs)
    tl.store(res_val_ptr + r * NT + tile, best)
    tl.store(res_idx_ptr + r * NT + tile, idx)
    fb_best, fb_idx = _first_argmax(lt + g, offs)
    tl.store(fb_val_ptr + r * NT + tile, fb_best)
    tl.store(fb_idx_ptr + r * NT + tile, fb_idx)


# ---------------------------------------------------------------------------------------------------------------
# Python wrappers.
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_tile_argmax_kernel, InterpretedFunction) and isinstance(
        triton.language.standard.max, InterpretedFunction
    )


def interpreter_active() -> bool:
    """True when both triton's library and these kernels were decorated in interpreter mode, i.e. CPU tensors work.

    Checking the objects (not the environment variable) catches the trap of setting TRITON_INTERPRET=1 after
    something already imported triton: the kernels then interpret but ``tl.max`` does not, and launches fail.
    """
    return _interpreted()



def default_block_v(V: int, device: torch.device) -> int:
    """Vocab tile width. GPU: 4096 (many programs at batch 1, 16 values per thread at 8 warps). Interpreter: up to
    16384, because there the cost is per program, not per element."""
    cap = 4096 if device.type == "cuda" else 16384
    return min(cap, triton.next_power_of_2(max(int(V), 1)))


def _launch_cfg(V: int, device: torch.device, block_v: int | None) -> tuple[int, int, int]:
    """(BLOCK_V, NT, num_warps)."""
    bv = default_block_v(V, device) if block_v is None else int(block_v)
    if bv < 1 or bv & (bv - 1):
        raise ValueError(f"block_v must be a power of two, got {bv}")
    num_warps = 8 if bv >= 4096 else 4
    return bv, triton.cdiv(V, bv), num_warps


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with unit stride; other strides are passed through (e.g. logits[:, -T:])."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [R, T, V], got {tuple(target_logits.shape)}")
    R, T, _ = target_logits.shape
    if tuple(draft_tokens.shape) != (R, T - 1):
        raise ValueError(f"draft_tokens must be [R, T-1] = {(R, T - 1)}, got {tuple(draft_tokens.shape)}")
    if tuple(num_drafts.shape) != (R,):
        raise ValueError(f"num_drafts must be [R] = {(R,)}, got {tuple(num_drafts.shape)}")
    dev = target_logits.device
    nd = num_drafts.to(device=dev, dtype=torch.int64).contiguous()
    drafts = draft_tokens.to(device=dev, dtype=torch.int64)
    # An empty [R, 0] tensor cannot be dereferenced; all its loads are masked off, so any int64 buffer will do.
    drafts = _unit_last(drafts) if drafts.numel() > 0 else nd.view(R, 1)
    return _unit_last(target_logits), drafts, nd


def _argmax_verify(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    nd: torch.Tensor,
    positions: torch.Tensor | None,
    key: int,
    gumbel: bool,
    block_v: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    R, T, V = logits.shape
    dev = logits.device
    # Written in full by _merge_walk_kernel: no initialisation launch needed.
    num_accepted = torch.empty(R, dtype=torch.int64, device=dev)
    next_token = torch.empty(R, dtype=torch.int64, device=dev)
    if R == 0:
        return num_accepted, next_token
    bv, nt, warps = _launch_cfg(V, dev, block_v)
    tile_val = torch.empty(R * T * nt, dtype=torch.float32, device=dev)
    tile_idx = torch.empty(R * T * nt, dtype=torch.int32, device=dev)
    pos = nd if positions is None else positions.to(device=dev, dtype=torch.int64).contiguous()
    _tile_argmax_kernel[(R * T, nt)](
        logits, logits.stride(0), logits.stride(1), nd, pos, tile_val, tile_idx,
        key, T, V, nt, RAGGED=True, GUMBEL=gumbel, BLOCK_V=bv, num_warps=warps,
    )  # fmt: skip
    _merge_walk_kernel[(R,)](
        tile_val, tile_idx, drafts, drafts.stride(0), nd, num_accepted, next_token, T, nt,
        BLOCK_T=triton.next_power_of_2(T), BLOCK_NT=triton.next_power_of_2(nt), num_warps=4,
    )  # fmt: skip
    return num_accepted, next_token


def greedy_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.greedy_verify``. ``block_v`` (power of two) overrides the vocab tile width."""
    logits, drafts, nd = _common(target_logits, draft_tokens, num_drafts)
    return _argmax_verify(logits, drafts, nd, None, 0, False, block_v)


def strict_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.strict_verify``."""
    logits, drafts, nd = _common(target_logits, draft_tokens, num_drafts)
    key = stream_key_i32(seed, STREAM_TARGET)
    return _argmax_verify(logits, drafts, nd, positions, key, True, block_v)


def sample_keyed(
    logits: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    stream: int = STREAM_DRAFT,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton ``reference.sample_keyed`` -> [R, T] int64."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [R, T, V], got {tuple(logits.shape)}")
    logits = _unit_last(logits)
    R, T, V = logits.shape
    dev = logits.device
    out = torch.empty(R, T, dtype=torch.int64, device=dev)
    if R * T == 0:
        return out
    bv, nt, warps = _launch_cfg(V, dev, block_v)
    tile_val = torch.empty(R * T * nt, dtype=torch.float32, device=dev)
    tile_idx = torch.empty(R * T * nt, dtype=torch.int32, device=dev)
    pos = positions.to(device=dev, dtype=torch.int64).contiguous()
    _tile_argmax_kernel[(R * T, nt)](
        logits, logits.stride(0), logits.stride(1), pos, pos, tile_val, tile_idx,
        stream_key_i32(seed, stream), T, V, nt, RAGGED=False, GUMBEL=True, BLOCK_V=bv, num_warps=warps,
    )  # fmt: skip
    _merge_tiles_kernel[(R * T,)](
        tile_val, tile_idx, tile_val, tile_idx, out, nt,
        HAS_FALLBACK=False, BLOCK_NT=triton.next_power_of_2(nt), num_warps=1,
    )  # fmt: skip
    return out


def ratio_verify(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.ratio_verify`` (speculative sampling with the drafter's q)."""
    logits, drafts, nd = _common(target_logits, draft_tokens, num_drafts)
    R, T, V = logits.shape
    if tuple(draft_logits.shape) != (R, T - 1, V):
        raise ValueError(f"draft_logits must be [R, T-1, V] = {(R, T - 1, V)}, got {tuple(draft_logits.shape)}")
    dev = logits.device
    D = T - 1
    # With no draft slots the draft row is never read; any buffer with 3 strides will do as its pointer.
    dlogits = _unit_last(draft_logits.to(dev)) if R * D > 0 else logits
    pos = positions.to(device=dev, dtype=torch.int64).contiguous()
    # With draft slots the accept kernel writes every row of num_accepted and row_stats; without (T == 1) nothing
    # is ever rejected: num_accepted = 0 and neutral normalisers (0, 1, 0, 1).
    alloc = torch.empty if D > 0 else torch.zeros
    num_accepted = alloc(R, dtype=torch.int64, device=dev)
    row_stats = alloc(R, 4, dtype=torch.float32, device=dev)
    if D == 0:
        row_stats[:, 1::2] = 1.0
    next_token = torch.empty(R, dtype=torch.int64, device=dev)
    if R == 0:
        return num_accepted, next_token
    bv, nt, warps = _launch_cfg(V, dev, block_v)
    if D > 0:
        stats = torch.empty(R * D * 4 * nt, dtype=torch.float32, device=dev)
        _ratio_stats_kernel[(R * D, nt)](
            logits, logits.stride(0), logits.stride(1), dlogits, dlogits.stride(0), dlogits.stride(1),
            nd, stats, T, V, nt, BLOCK_V=bv, num_warps=warps,
        )  # fmt: skip
        _ratio_accept_kernel[(R,)](
            logits, logits.stride(0), logits.stride(1), dlogits, dlogits.stride(0), dlogits.stride(1),
            drafts, drafts.stride(0), nd, pos, stats, num_accepted, row_stats,
            stream_key_i32(seed, STREAM_ACCEPT), T, V, nt,
            BLOCK_T=triton.next_power_of_2(D), BLOCK_NT=triton.next_power_of_2(nt), num_warps=4,
        )  # fmt: skip
    res_val = torch.empty(R * nt, dtype=torch.float32, device=dev)
    res_idx = torch.empty(R * nt, dtype=torch.int32, device=dev)
    fb_val = torch.empty(R * nt, dtype=torch.float32, device=dev)
    fb_idx = torch.empty(R * nt, dtype=torch.int32, device=dev)
    _residual_tile_kernel[(R, nt)](
        logits, logits.stride(0), logits.stride(1), dlogits, dlogits.stride(0), dlogits.stride(1),
        nd, pos, num_accepted, row_stats, res_val, res_idx, fb_val, fb_idx,
        stream_key_i32(seed, STREAM_RESIDUAL), stream_key_i32(seed, STREAM_TARGET), T, V, nt,
        BLOCK_V=bv, num_warps=warps,
    )  # fmt: skip
    _merge_tiles_kernel[(R,)](
        res_val, res_idx, fb_val, fb_idx, next_token, nt,
        HAS_FALLBACK=True, BLOCK_NT=triton.next_power_of_2(nt), num_warps=1,
    )  # fmt: skip
    return num_accepted, next_token
