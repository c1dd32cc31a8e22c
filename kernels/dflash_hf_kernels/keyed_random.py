"""Counter-based, keyed randomness shared bit-for-bit by the torch reference and the Triton kernels.

Every random number used by verification is a pure function of
``(seed, absolute_position, token_id, stream)``. Nothing depends on the batch a request sits in, on the row it
occupies, or on how a block is laid out, so a request's samples are reproducible whatever it is batched with.

The hash is MurmurHash3 (x86, 32-bit) over two 32-bit words ``[position, token_id]``, seeded with a per-(seed,
stream) *key*. The key is computed once on the host (plain Python ints) from the 64-bit user seed and the stream
constant; the per-element part runs on device (Triton ``uint32`` arithmetic, which wraps) or in torch (``int64``
tensors masked with ``& 0xFFFFFFFF`` after each step). Both give identical 32-bit hashes.

The uniform keeps the top 23 bits of the hash: ``u = (2·(h >> 9) + 1) / 2**24`` lies in [2**-24, 1 - 2**-24],
is exactly representable in fp32 and is computed exactly by both paths (so it is bit-identical). Gumbel noise is
``-log(-log(u))``; ``log`` may differ by one ulp between implementations, which only matters on exact near-ties.
"""

from __future__ import annotations

import torch

__all__ = [
    "STREAM_TARGET",
    "STREAM_ACCEPT",
    "STREAM_RESIDUAL",
    "STREAM_DRAFT",
    "MASK32",
    "stream_key",
    "stream_key_i32",
    "keyed_hash",
    "keyed_uniform",
    "keyed_gumbel",
]

# Distinct streams, so the target sample, the acceptance coin, the residual resample and the draft sample at the
# same (seed, position, token) never share noise.
STREAM_TARGET: int = 1
STREAM_ACCEPT: int = 2
STREAM_RESIDUAL: int = 3
STREAM_DRAFT: int = 4

MASK32: int = 0xFFFFFFFF

# MurmurHash3 x86_32 constants.
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_N = 0xE6546B64
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35


# ---------------------------------------------------------------------------------------------------------------
# Host side (Python ints): the per-(seed, stream) key.
# ---------------------------------------------------------------------------------------------------------------


def _rotl_int(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & MASK32


def _word_int(h: int, k: int) -> int:
    k = (k * _C1) & MASK32
    k = _rotl_int(k, 15)
    k = (k * _C2) & MASK32
    h ^= k
    h = _rotl_int(h, 13)
    return (h * 5 + _N) & MASK32


def _fmix_int(h: int) -> int:
    h ^= h >> 16
    h = (h * _F1) & MASK32
    h ^= h >> 13
    h = (h * _F2) & MASK32
    h ^= h >> 16
    return h


def stream_key(seed: int, stream: int) -> int:
    """32-bit key (unsigned, as a Python int) for one user seed (any int, taken modulo 2**64) and stream."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    h = 0
    for word in (seed & MASK32, seed >> 32, int(stream) & MASK32):
        h = _word_int(h, word)
    return _fmix_int(h ^ 12)


def stream_key_i32(seed: int, stream: int) -> int:
    """The same key reinterpreted as a signed int32, the form a Triton kernel argument needs (it bitcasts back)."""
    key = stream_key(seed, stream)
    return key - (1 << 32) if key >= (1 << 31) else key


# ---------------------------------------------------------------------------------------------------------------
# Tensor side (torch int64 holding uint32 values).
# ---------------------------------------------------------------------------------------------------------------


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for a in [0, 2**32), without overflowing int64: multiply by c's 16-bit halves."""
    lo = a * (c & 0xFFFF)  # < 2**48
    hi = ((a * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits of the high product survive mod 2**32
    return (lo + hi) & MASK32


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) & MASK32) | (x >> (32 - r))


def _word(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _mul32(k, _C1)
    k = _rotl(k, 15)
    k = _mul32(k, _C2)
    h = h ^ k
    h = _rotl(h, 13)
    return (h * 5 + _N) & MASK32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return h ^ (h >> 16)


def keyed_hash(key: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """32-bit hash (int64 tensor) of broadcast ``positions`` and ``token_ids`` under a ``stream_key``."""
    pos = positions.to(torch.int64) & MASK32
    tok = token_ids.to(torch.int64) & MASK32
    h = _word(torch.full_like(pos, int(key) & MASK32), pos)
    h = _word(h, tok)
    return _fmix(h ^ 8)


def keyed_uniform(key: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [2**-24, 1 - 2**-24], bit-identical to the Triton ``_uniform``."""
    h = keyed_hash(key, positions, token_ids)
    return (h >> 9).to(torch.float32) * (2.0**-23) + 2.0**-24


def keyed_gumbel(key: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` (fp32) for the keyed uniforms."""
    u = keyed_uniform(key, positions, token_ids)
    return -torch.log(-torch.log(u))
