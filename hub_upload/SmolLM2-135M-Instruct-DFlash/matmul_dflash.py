"""The CPU few-row matmul routine DFlash's own forwards run under, and the per-process plan of when to use it.

Portable core: imports only torch, the standard library and sibling modules; copied into every published drafter,
where it must not touch files (so the plan lives in memory).

DFlash's verify forwards and drafts multiply every weight by a handful of rows (the block); plain decoding by
one. CPU BLAS often computes that poorly (see ``linear_for_few_rows``), so on CPU those forwards run their linear
layers through ``planned_linear``; plain ``generate`` never does. Which product is fastest depends on the CPU, the
BLAS build and the thread count, so no fixed rule decides: ``FewRowPlan`` times BLAS and the routine's recipes (how
many rows it computes, how it lays the result out) at every few-row count the first time a weight shape is met
in the process, and keeps the fastest.

How a forward reaches the plan: ``few_row_products`` makes a plan current for the calling thread. The drafter's
own layers are ``FewRowLinear``; the target's plain ``nn.Linear`` layers are routed only while ``routed_linears``
is open around a DFlash generate call, and restored after it. Both are direct calls: a torch function mode, which
sees every op, cost about 10 ms of a 72 ms verify forward and 0.8 ms of a 6.6 ms draft on the default pair
(benchmarks/routing_cost.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = range(2, 17)
PADDED_ROWS = (4, 8, 16)  # row counts the routine may pad a product up to, where BLAS computes them faster
BLAS_MARGIN = 0.9  # BLAS keeps a product only when it is clearly faster: noise must not flip a near-tie
_POOL_BYTES = 64 * 2**20  # weights are cycled through copies this large, so each product streams from memory
_REPEATS = 5


class FewRowRecipe(NamedTuple):
    """How :func:`linear_for_few_rows` computes a product: over ``rows`` rows (zero rows pad the input up to that
    many; their results are dropped), and with the ``[out, rows]`` result laid out as ``[rows, out]`` by a
    channels-last copy (``channels_last``) or by a plain transposed copy."""

    rows: int
    channels_last: bool = False


def linear_for_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        recipe: FewRowRecipe | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``weight @ x^T``; x [..., in] with 2-16 rows -> [..., out].

    Why: CPU BLAS (MKL, 2 threads, float32) runs ``x @ weight^T`` for a handful of rows as a skinny GEMM far below
    memory bandwidth, and a single row as a matrix-vector product on one core. The transposed product streams the
    weight once on every core: 1536 x 576, 4 rows: 96 us instead of 322 us; 49152 x 576, 4 rows: 2.6 ms instead of
    12.5 ms (benchmarks/cpu_linear.py). The result differs only by float summation order.

    ``recipe`` (default: the rows as they are, a transposed copy) is what the plan measured fastest: BLAS may run
    a product faster over more rows (on a Zen 3's MKL, 4 rows of a 49152 x 576 LM head take less time than 3), and
    torch's transposed copy of a ``[out, rows]`` result is slow for a handful of rows, where a channels-last copy
    moves the same data faster.
    """
    rows = x.reshape(-1, x.shape[-1])  # [n, in]
    n, out_features = rows.shape[0], weight.shape[0]
    recipe = recipe or FewRowRecipe(n)
    if recipe.rows > n:
        rows = F.pad(rows, (0, 0, 0, recipe.rows - n))
    if bias is None:
        out = torch.mm(weight, rows.T)  # [out, recipe.rows]
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, rows.T)
    if recipe.rows > n:
        out = out[:, :n]
    if recipe.channels_last:
        # [1, out, n, 1] in channels-last memory is [n, out] row-major: the permute and reshape below are views
        out = out[None, :, :, None].contiguous(memory_format=torch.channels_last)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], out_features)
    return out.T.contiguous().view(*x.shape[:-1], out_features)


def routine_recipes(rows: int) -> list[FewRowRecipe]:
    """The recipes the plan times for a product over ``rows`` rows: the rows as they are and each padded row count
    of ``PADDED_ROWS`` under four times as many (more would cost more than it could save), each with either copy."""
    counts = [rows] + [p for p in PADDED_ROWS if rows < p < 4 * rows]
    return [FewRowRecipe(count, channels_last) for count in counts for channels_last in (False, True)]


def time_products(weight: torch.Tensor, rows: int, bias: torch.Tensor | None,
                  recipes: Sequence[FewRowRecipe | None]) -> list[float]:
    """Median seconds of each way of computing ``F.linear`` over ``rows`` rows (None: BLAS's own product; a recipe:
    ``linear_for_few_rows``), interleaved, each product on another copy of ``weight`` (as in a forward, where every
    weight is read once, not from cache)."""
    copies = max(1, min(64, _POOL_BYTES // max(1, weight.numel() * weight.element_size())))
    pool = [weight] + [weight.clone() for _ in range(copies - 1)]
    # A private generator: the global one drives sampling, and a first call must sample as every later one does.
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in recipes]
    for turn in range(len(recipes) * (_REPEATS + 1)):
        which = turn % len(recipes)
        recipe, w = recipes[which], pool[turn % len(pool)]
        start = time.perf_counter()
        F.linear(x, w, bias) if recipe is None else linear_for_few_rows(x, w, bias, recipe)
        if turn >= len(recipes):  # the first of each is a warm-up
            times[which].append(time.perf_counter() - start)
    return [sorted(t)[_REPEATS // 2] for t in times]


class FewRowPlan:
    """How a float32 (out, in, rows, bias) product is computed, by measurement: BLAS's own product (None) or a
    :class:`FewRowRecipe` of ``linear_for_few_rows``.

    A weight is timed the first time it is met (``time_products`` over BLAS and ``routine_recipes``: about a
    millisecond for most shapes, a few tenths of a second for a large LM head), at the rows asked for and at every
    other row count of ``together_rows``, and the answers are kept for the rest of the process. How many rows a
    weight meets depends on acceptance (drafts verified per step, tokens accepted), so timing them together is what
    lets one run calibrate every later one. The fastest recipe is taken unless BLAS is clearly faster than it. A
    product already in ``choices`` is not timed: the tools fill it from an earlier process's measurements of the
    same machine (``dflash_hf.tools.calibration``; this module itself never touches files).
    """

    def __init__(self, measure: Callable[[torch.Tensor, int, torch.Tensor | None, Sequence[FewRowRecipe | None]],
                                         list[float]] = time_products,
                 together_rows: Sequence[int] = FEW_ROWS) -> None:
        self.measure = measure
        self.together_rows = tuple(together_rows)
        self._lock = threading.Lock()
        self.choices: dict[tuple[int, int, int, bool], FewRowRecipe | None] = {}  # (out, in, rows, bias) -> recipe
        self.timings: dict[tuple[int, int, int, bool], dict[FewRowRecipe | None, float]] = {}  # seconds by way
        self.measuring_s = 0.0  # wall time spent timing products: a one-time cost a caller may report apart

    def recipe_for(self, weight: torch.Tensor, rows: int, bias: torch.Tensor | None) -> FewRowRecipe | None:
        key = (weight.shape[0], weight.shape[1], rows, bias is not None)  # a tuple: this runs for every product
        try:
            return self.choices[key]
        except KeyError:
            pass
        with self._lock:
            for count in (rows, *self.together_rows):
                self._choose((key[0], key[1], count, key[3]), weight, bias)
            return self.choices[key]

    def _choose(self, key: tuple[int, int, int, bool], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if key in self.choices:
            return
        ways: list[FewRowRecipe | None] = [None, *routine_recipes(key[2])]
        started = time.perf_counter()
        seconds = self.measure(weight.detach(), key[2], None if bias is None else bias.detach(), ways)
        self.measuring_s += time.perf_counter() - started
        self.timings[key] = dict(zip(ways, seconds))
        best = min(range(1, len(ways)), key=seconds.__getitem__)
        self.choices[key] = None if seconds[0] < BLAS_MARGIN * seconds[best] else ways[best]


class AlwaysRoutine:
    """The plan of ``drafter.few_row_matmul_on_cpu = "always"``: every few-row product takes the routine, over its
    own rows with a transposed copy."""

    measuring_s = 0.0  # it never measures (the same field as FewRowPlan's, for callers that report it)

    def recipe_for(self, weight: torch.Tensor, rows: int, bias: torch.Tensor | None) -> FewRowRecipe | None:
        return FewRowRecipe(rows)


_measured_plans: dict[int, FewRowPlan] = {}


def measured_plan() -> FewRowPlan:
    """This process's plan for the current thread count (timings change with it)."""
    threads = torch.get_num_threads()
    plan = _measured_plans.get(threads)
    if plan is None:
        plan = _measured_plans.setdefault(threads, FewRowPlan())
    return plan


def routine_recipe(plan: "FewRowPlan | AlwaysRoutine", x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> FewRowRecipe | None:
    """How :func:`linear_for_few_rows` computes ``F.linear(x, weight, bias)`` under ``plan``, or None where BLAS
    does: the routine needs float32 on CPU and 2-16 rows, and the plan's measurement must favour it."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and rows in FEW_ROWS):
        return plan.recipe_for(weight, rows, bias)
    return None


def _plan_for(device: torch.device, setting: bool | str) -> "FewRowPlan | AlwaysRoutine | None":
    """The plan of ``drafter.few_row_matmul_on_cpu``: measured (True), every product ("always"), none (False, or
    off CPU)."""
    if setting is False or torch.device(device).type != "cpu":
        return None
    return AlwaysRoutine() if setting == "always" else measured_plan()


# The plan current in each thread (attribute ``plan``): concurrent generate calls (threads of a service) each see
# their own, and a thread that opened none computes every product with BLAS.
_current = threading.local()


@contextlib.contextmanager
def few_row_products(device: torch.device, setting: bool | str = True) -> Iterator[None]:
    """While open, :func:`planned_linear` in this thread follows the plan of ``setting`` (see ``_plan_for``): DFlash
    opens it around each draft and each verify forward (never the prefill)."""
    previous = getattr(_current, "plan", None)
    _current.plan = _plan_for(device, setting)
    try:
        yield
    finally:
        _current.plan = previous


def planned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, computed by :func:`linear_for_few_rows` where this thread's current plan says so."""
    plan = getattr(_current, "plan", None)
    recipe = None if plan is None else routine_recipe(plan, x, weight, bias)
    if recipe is not None:
        return linear_for_few_rows(x, weight, bias, recipe)
    return F.linear(x, weight, bias)


def _planned_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return planned_linear(x, self.weight, self.bias)


class FewRowLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) computed by :func:`planned_linear`: the drafter's layers."""

    forward = _planned_forward


_routing_lock = threading.Lock()
_routed_models: dict[int, tuple[int, list[nn.Linear]]] = {}  # id(model) -> (open routed_linears, routed layers)


@contextlib.contextmanager
def routed_linears(model: nn.Module, device: torch.device, setting: bool | str = True) -> Iterator[None]:
    """While open, ``model``'s plain ``nn.Linear`` layers compute through :func:`planned_linear`, and are restored
    when the last concurrent opener closes; nothing is touched where ``setting`` gives no plan on ``device`` (off
    CPU, or False), so a GPU forward pays no extra call. A thread with no current plan (a plain ``generate`` on the
    same model meanwhile) still gets ``F.linear``, bit for bit. Layers whose ``forward`` someone already replaced
    (accelerate's device-map hooks) and subclasses (quantized layers) are left as they are."""
    if _plan_for(device, setting) is None:
        yield
        return
    key = id(model)
    with _routing_lock:
        opened, layers = _routed_models.get(key, (0, []))
        if not opened:
            layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
            for layer in layers:
                layer.forward = _planned_forward.__get__(layer)
        _routed_models[key] = (opened + 1, layers)
    try:
        yield
    finally:
        with _routing_lock:
            opened, layers = _routed_models.pop(key)
            if opened > 1:
                _routed_models[key] = (opened - 1, layers)
            else:
                for layer in layers:
                    if getattr(layer.__dict__.get("forward"), "__func__", None) is _planned_forward:
                        del layer.forward
