"""Backend selection: the fused Triton kernels on CUDA, the pure-torch reference elsewhere.

``DFLASH_HF_VERIFY=triton|torch`` forces a backend (``auto`` or unset: choose by device). Triton is imported only
when it is about to be used, so this package imports fine without it, and a CPU run never pays for the import.
Forcing ``triton`` on CPU tensors is allowed when ``TRITON_INTERPRET=1`` was set before triton was first imported
(that is how the tests run the kernels); otherwise it is a clear error rather than an obscure launch failure.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Literal

import torch

from . import reference
from .keyed_random import STREAM_DRAFT

__all__ = [
    "ENV_VAR",
    "Backend",
    "Mode",
    "triton_available",
    "select_backend",
    "verify",
    "greedy_verify",
    "strict_verify",
    "ratio_verify",
    "sample_keyed",
]

ENV_VAR = "DFLASH_HF_VERIFY"
Backend = Literal["triton", "torch"]
Mode = Literal["greedy", "strict", "ratio"]


def _import_triton_backend() -> ModuleType:
    """The Triton kernel module (imports triton; raises if it is missing or broken). Tests monkeypatch this."""
    from . import triton_verify

    return triton_verify


def triton_available() -> bool:
    """True when the Triton kernels can be imported."""
    try:
        _import_triton_backend()
    except Exception:  # ImportError, or a broken triton install failing at import time
        return False
    return True


def _require_triton(device: torch.device) -> ModuleType:
    """Return the Triton module for an explicitly requested Triton backend, or raise a RuntimeError saying why not."""
    try:
        module = _import_triton_backend()
    except Exception as exc:
        raise RuntimeError(
            f"The Triton verification backend was requested ({ENV_VAR}=triton or backend='triton') but Triton "
            f"cannot be imported ({type(exc).__name__}: {exc}). Install it (`pip install triton`, or "
            f"`pip install 'dflash-hf[kernels]'`), or use the torch backend ({ENV_VAR}=torch)."
        ) from exc
    if device.type != "cuda" and not module.interpreter_active():
        raise RuntimeError(
            f"The Triton verification backend was requested for {device.type} tensors. Triton runs on CUDA "
            "devices, or on CPU only in interpreter mode: set TRITON_INTERPRET=1 at the start of the process, "
            "before triton is first imported (importing transformers or torch._dynamo may import it)."
        )
    return module


def select_backend(device: torch.device | str) -> Backend:
    """'triton' or 'torch' for tensors on ``device``, honouring the DFLASH_HF_VERIFY override."""
    dev = torch.device(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("", "auto"):
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if forced == "torch":
        return "torch"
    if forced == "triton":
        _require_triton(dev)
        return "triton"
    raise ValueError(f"{ENV_VAR}={forced!r} is not understood: use 'triton', 'torch' or 'auto'.")


def _backend_module(backend: str | None, device: torch.device) -> tuple[ModuleType, Backend]:
    name = select_backend(device) if backend is None else backend
    if name == "torch":
        return reference, "torch"
    if name == "triton":
        return _require_triton(device), "triton"
    raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")


def verify(
    mode: Mode,
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    *,
    draft_logits: torch.Tensor | None = None,
    seed: int | None = None,
    positions: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Backend]:
    """Verify one block of drafts for R requests -> (num_accepted [R], next_token [R], backend name).

    mode: 'greedy' (argmax), 'strict' (sample the target, accept while equal; needs seed and positions) or
    'ratio' (speculative sampling with the drafter's q; additionally needs draft_logits [R, T-1, V]).
    backend: 'triton', 'torch' or None (select_backend on the logits' device).
    """
    module, name = _backend_module(backend, target_logits.device)
    if mode == "greedy":
        na, nt = module.greedy_verify(target_logits, draft_tokens, num_drafts)
        return na, nt, name
    if seed is None or positions is None:
        raise ValueError(f"mode={mode!r} samples: pass seed (int) and positions ([R] int64 absolute positions)")
    if mode == "strict":
        na, nt = module.strict_verify(target_logits, draft_tokens, num_drafts, seed, positions)
        return na, nt, name
    if mode == "ratio":
        if draft_logits is None:
            raise ValueError("mode='ratio' needs draft_logits [R, T-1, V] (the drafter's processed logits)")
        na, nt = module.ratio_verify(target_logits, draft_logits, draft_tokens, num_drafts, seed, positions)
        return na, nt, name
    raise ValueError(f"mode must be 'greedy', 'strict' or 'ratio', got {mode!r}")


# Dispatching versions of the per-mode functions (same signatures as reference.py, plus ``backend``).


def greedy_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    module, _ = _backend_module(backend, target_logits.device)
    return module.greedy_verify(target_logits, draft_tokens, num_drafts)


def strict_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    module, _ = _backend_module(backend, target_logits.device)
    return module.strict_verify(target_logits, draft_tokens, num_drafts, seed, positions)


def ratio_verify(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    module, _ = _backend_module(backend, target_logits.device)
    return module.ratio_verify(target_logits, draft_logits, draft_tokens, num_drafts, seed, positions)


def sample_keyed(
    logits: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    stream: int = STREAM_DRAFT,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    module, _ = _backend_module(backend, logits.device)
    return module.sample_keyed(logits, seed, positions, stream)
