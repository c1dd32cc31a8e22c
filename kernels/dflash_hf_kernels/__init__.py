"""Fused speculative-verification kernels for dflash_hf (installed as ``dflash_hf.kernels``).

Public API (all verifiers return ``(num_accepted [R] int64, next_token [R] int64)``; shapes in ``reference``):

    greedy_verify(target_logits, draft_tokens, num_drafts, *, backend=None)
    strict_verify(target_logits, draft_tokens, num_drafts, seed, positions, *, backend=None)
    ratio_verify(target_logits, draft_logits, draft_tokens, num_drafts, seed, positions, *, backend=None)
    sample_keyed(logits, seed, positions, stream=STREAM_DRAFT, *, backend=None) -> [R, T] int64
    verify(mode, target_logits, draft_tokens, num_drafts, *, draft_logits=None, seed=None, positions=None,
           backend=None) -> (num_accepted, next_token, backend_name)
    select_backend(device) -> "triton" | "torch"      (env DFLASH_HF_VERIFY=triton|torch|auto)

``reference`` holds the pure-torch implementations; ``triton_verify`` the Triton ones (imported lazily, only when
used, so triton stays optional).
"""

from . import reference
from .dispatch import (
    ENV_VAR,
    greedy_verify,
    ratio_verify,
    sample_keyed,
    select_backend,
    strict_verify,
    triton_available,
    verify,
)
from .keyed_random import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    STREAM_TARGET,
    keyed_gumbel,
    keyed_uniform,
    stream_key,
)

__all__ = [
    "ENV_VAR",
    "STREAM_ACCEPT",
    "STREAM_DRAFT",
    "STREAM_RESIDUAL",
    "STREAM_TARGET",
    "greedy_verify",
    "keyed_gumbel",
    "keyed_uniform",
    "ratio_verify",
    "reference",
    "sample_keyed",
    "select_backend",
    "stream_key",
    "strict_verify",
    "triton_available",
    "verify",
]
