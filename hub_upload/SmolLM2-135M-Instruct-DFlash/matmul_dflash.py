"""The CPU few-row matmul routine DFlash's own forwards run under.

Portable core: imports only torch and sibling modules; copied into every published drafter.

DFlash's verify forwards and drafts multiply every weight by a handful of rows (the block); plain decoding by
one. CPU BLAS computes both poorly (see ``linear_for_few_rows``), so on CPU those forwards run under
``FewRowLinearMode``; plain ``generate`` never does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


FEW_ROWS = range(2, 17)


def linear_for_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``weight @ x^T``; x [..., in] with 2-16 rows -> [..., out].

    Why: CPU BLAS (MKL, 2 threads, float32) runs ``x @ weight^T`` for a handful of rows as a skinny GEMM far below
    memory bandwidth, and a single row as a matrix-vector product on one core. The transposed product streams the
    weight once on every core: 1536 x 576, 4 rows: 96 us instead of 322 us; 49152 x 576, 4 rows: 2.6 ms instead of
    12.5 ms (benchmarks/cpu_linear.py). The result differs only by float summation order.
    """
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        out = torch.mm(weight, rows.T)  # [out, rows]
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, rows.T)
    return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


class FewRowLinearMode(TorchFunctionMode):
    """Routes float32 CPU ``F.linear`` calls over 2-16 rows to :func:`linear_for_few_rows`; all else untouched.

    Active only around DFlash's own forwards (verify blocks and drafts), never around plain decoding.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Called for every torch op inside the forward: only F.linear is looked at.
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
            if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                    and weight.dim() == 2 and x.numel() // max(x.shape[-1], 1) in FEW_ROWS):
                return linear_for_few_rows(x, weight, bias)
        return func(*args, **(kwargs or {}))


def few_row_linear(device: torch.device, enabled: bool = True) -> Any:
    """The context DFlash's own forwards run under on ``device``: :class:`FewRowLinearMode` on CPU when enabled
    (``drafter.few_row_matmul_on_cpu``), else nothing."""
    return FewRowLinearMode() if enabled and torch.device(device).type == "cpu" else contextlib.nullcontext()
