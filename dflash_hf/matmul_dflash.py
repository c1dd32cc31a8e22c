"""The CPU few-row matmul routine DFlash's own forwards run under, and the per-machine plan of when to use it.

Portable core: imports only torch, the standard library and sibling modules; copied into every published drafter.

DFlash's verify forwards and drafts multiply every weight by a handful of rows (the block); plain decoding by
one. CPU BLAS often computes that poorly (see ``linear_for_few_rows``), so on CPU those forwards run under
``FewRowLinearMode``; plain ``generate`` never does. Which of the two products is faster depends on the CPU, the
BLAS build and the thread count, so the mode does not follow one rule: ``FewRowPlan`` times both products once
per (weight shape, rows) on the running machine and remembers the answer on disk, per CPU, torch version and
thread count.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode


FEW_ROWS = range(2, 17)
PLAN_ENV = "DFLASH_FEW_ROW_PLAN"  # "measure" (default): calibrate per machine; "always": route every few-row product
BLAS_MARGIN = 0.9  # BLAS keeps a product only when it is clearly faster: noise must not flip a near-tie
_POOL_BYTES = 64 * 2**20  # weights are cycled through copies this large, so each product streams from memory
_REPEATS = 5


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


def dflash_cache_dir() -> Path:
    """``$DFLASH_HF_CACHE``, else ``$XDG_CACHE_HOME/dflash_hf``, else ``~/.cache/dflash_hf``."""
    if os.environ.get("DFLASH_HF_CACHE"):
        return Path(os.environ["DFLASH_HF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dflash_hf"


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    """Model name, family, model number and AVX512 flags of the first CPU: virtual machines often report only
    "AMD EPYC", for a Zen 3 and a Zen 4 alike."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()]
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family')}, model "
            f"{fields.get('model')}, {' '.join(flags) or 'no avx'})")


def machine_key() -> str:
    """What a few-row timing depends on: the CPU model, the torch build and the thread count."""
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_both_products(weight: torch.Tensor, rows: int, bias: torch.Tensor | None) -> tuple[float, float]:
    """Median seconds of BLAS's ``F.linear`` and of ``linear_for_few_rows`` over ``rows`` rows, interleaved, each
    product on another copy of ``weight`` (as in a forward, where every weight is read once, not from cache)."""
    copies = max(1, min(64, _POOL_BYTES // max(1, weight.numel() * weight.element_size())))
    pool = [weight] + [weight.clone() for _ in range(copies - 1)]
    # A private generator: the global one drives sampling, and a first call must sample as every later one does.
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    times: dict[bool, list[float]] = {False: [], True: []}
    for turn in range(2 * (_REPEATS + 1)):
        routine = bool(turn % 2)
        w = pool[turn % len(pool)]
        start = time.perf_counter()
        linear_for_few_rows(x, w, bias) if routine else torch.nn.functional.linear(x, w, bias)
        if turn >= 2:  # the first of each is a warm-up
            times[routine].append(time.perf_counter() - start)
    return sorted(times[False])[_REPEATS // 2], sorted(times[True])[_REPEATS // 2]


class FewRowPlan:
    """Whether ``linear_for_few_rows`` computes a float32 (out, in, rows, bias) product on this machine.

    Each product is timed the first time it is met (``time_both_products``; a fraction of a millisecond for most
    shapes, a few tens for a large LM head) and the answer is kept in memory and in ``path``, a JSON file written
    atomically; a file that cannot be read or written is ignored (the plan then lives in memory only).
    """

    def __init__(self, path: str | os.PathLike | None = None,
                 measure: Callable[[torch.Tensor, int, torch.Tensor | None], tuple[float, float]] = time_both_products
                 ) -> None:
        self.path = Path(path) if path is not None else None
        self.measure = measure
        self._lock = threading.Lock()
        self.choices: dict[tuple[int, int, int, bool], bool] = self._read()  # (out, in, rows, bias) -> routine?

    def use_routine(self, weight: torch.Tensor, rows: int, bias: torch.Tensor | None) -> bool:
        key = (weight.shape[0], weight.shape[1], rows, bias is not None)  # a tuple: this runs for every product
        choice = self.choices.get(key)
        if choice is None:
            with self._lock:
                choice = self.choices.get(key)
                if choice is None:
                    blas_s, routine_s = self.measure(weight.detach(), rows, None if bias is None else bias.detach())
                    choice = self.choices[key] = not blas_s < BLAS_MARGIN * routine_s
                    self._write()
        return choice

    def _read(self) -> dict[tuple[int, int, int, bool], bool]:
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8")) if self.path else {}
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("machine") != machine_key():
            return {}  # another CPU, torch or thread count: measure again
        choices = {}
        for entry in saved.get("choices", []):
            with contextlib.suppress(TypeError, ValueError):
                out_features, in_features, rows, bias, routine = entry
                if isinstance(bias, bool) and isinstance(routine, bool):
                    choices[(int(out_features), int(in_features), int(rows), bias)] = routine
        return choices

    def _write(self) -> None:
        if self.path is None:
            return
        entries = [[*key, routine] for key, routine in sorted(self.choices.items())]
        text = json.dumps({"machine": machine_key(), "choices": entries}, indent=1)
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
        except OSError:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


class AlwaysRoutine:
    """The plan of ``DFLASH_FEW_ROW_PLAN=always``: every few-row product takes the routine (no timing)."""

    def use_routine(self, weight: torch.Tensor, rows: int, bias: torch.Tensor | None) -> bool:
        return True


_default_plans: dict[str, Any] = {}


def default_plan() -> FewRowPlan | AlwaysRoutine:
    """The plan of this process: measured and cached under ``dflash_cache_dir()`` (one file per machine key),
    unless ``DFLASH_FEW_ROW_PLAN=always``."""
    setting = os.environ.get(PLAN_ENV, "measure")
    if setting not in ("measure", "always"):
        raise ValueError(f"{PLAN_ENV}={setting!r}: use 'measure' (time both products once per machine, the "
                         "default) or 'always' (the few-row routine for every 2-16 row product).")
    if setting == "always":
        return AlwaysRoutine()
    key = machine_key()
    if key not in _default_plans:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        _default_plans[key] = FewRowPlan(dflash_cache_dir() / f"few_row_plan-{digest}.json")
    return _default_plans[key]


class FewRowLinearMode(TorchFunctionMode):
    """Routes float32 CPU ``F.linear`` calls over 2-16 rows to :func:`linear_for_few_rows` where the plan says it is
    faster on this machine; all else untouched.

    Active only around DFlash's own forwards (verify blocks and drafts), never around plain decoding.
    """

    def __init__(self, plan: FewRowPlan | AlwaysRoutine | None = None) -> None:
        super().__init__()
        self.plan = plan if plan is not None else default_plan()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Called for every torch op inside the forward: only F.linear is looked at. Inside this method the mode
        # is off, so the plan's timings run the plain products.
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                    and weight.dim() == 2 and rows in FEW_ROWS and self.plan.use_routine(weight, rows, bias)):
                return linear_for_few_rows(x, weight, bias)
        return func(*args, **(kwargs or {}))


def few_row_linear(device: torch.device, enabled: bool = True) -> Any:
    """The context DFlash's own forwards run under on ``device``: :class:`FewRowLinearMode` on CPU when enabled
    (``drafter.few_row_matmul_on_cpu``), else nothing."""
    return FewRowLinearMode() if enabled and torch.device(device).type == "cpu" else contextlib.nullcontext()
