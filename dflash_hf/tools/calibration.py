"""This machine's one-time measurements, kept on disk so that the next process starts at once.

Three things are measured on first use, because no rule predicts them across CPUs: the few-row plan's choice for
each (weight shape, rows) product (``matmul_dflash.FewRowPlan``), the dtype a drafter drafts fastest in
(``draft_precision.fastest_drafter_dtype``), and what a target forward over n new positions costs
(``measure_verify_costs``, from which each step's number of drafts is chosen). All depend on the CPU, the thread
count and the library builds, so they are cached in one JSON file per (CPU model and flags, thread count, torch / transformers / dflash-hf
versions) under ``cache_root()/calibration/``, written atomically. Another machine or an upgrade gets its own
file. ``DFLASH_HF_RECALIBRATE=1`` (or a command's ``--recalibrate``) measures again and replaces the file.

The portable core never reads these files (a published drafter must not touch the disk): the tools fill the
in-memory plan from them before a command runs and save what it measured after.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core import matmul_dflash
from ..core.cache_dflash import crop_cache, has_linear_attention, uncroppable_cache_problem
from ..core.matmul_dflash import FewRowPlan, FewRowRecipe
from ..core.schedule_dflash import VerifyCosts
from ..fileio import atomic_write_text
from ..machine import cpu_facts, dtype_name
from ..training.default_pair import cache_root

RECALIBRATE_ENV = "DFLASH_HF_RECALIBRATE"
_FORMAT = 1


def machine_identity() -> dict:
    """What the cached measurements depend on: the CPU, the threads torch uses and the library versions."""
    import transformers

    from .. import __version__

    return {
        "format": _FORMAT,
        **cpu_facts(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dflash_hf": __version__,
    }


def calibration_path(identity: dict | None = None) -> Path:
    """``cache_root()/calibration/<digest of machine_identity()>.json``."""
    identity = machine_identity() if identity is None else identity
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "calibration" / f"{digest}.json"


def recalibration_requested() -> bool:
    return os.environ.get(RECALIBRATE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def drafter_key(target: Any, drafter: Any) -> str:
    """The shapes a draft's cost depends on: the drafter's layers and the target's LM head it borrows."""
    c = drafter.config
    return (f"hidden{c.hidden_size}-layers{c.num_hidden_layers}-heads{c.num_attention_heads}/"
            f"{c.num_key_value_heads}-mlp{c.intermediate_size}-block{c.block_size}-taps{c.num_taps}x"
            f"{c.target_hidden_size}-vocab{target.config.vocab_size}-target_{dtype_name(target.dtype)}")


ShapeKey = tuple[int, int, int, bool]  # FewRowPlan's key: (out features, in features, rows, has bias)


def _encode_few_row(choices: dict[ShapeKey, FewRowRecipe | None]) -> dict[str, list | None]:
    """JSON form: ``"out,in,rows,bias"`` -> ``[rows, channels_last]``, or None where BLAS was chosen."""
    return {",".join(map(str, key)): None if recipe is None else [recipe.rows, recipe.channels_last]
            for key, recipe in sorted(choices.items())}


def _decode_few_row(data: Any) -> dict[ShapeKey, FewRowRecipe | None]:
    """The inverse of ``_encode_few_row``; raises ValueError/TypeError on anything it did not write."""
    choices: dict[ShapeKey, FewRowRecipe | None] = {}
    for key, value in dict(data).items():
        out, inp, rows, bias = key.split(",")
        if bias not in ("True", "False") or not (value is None or (isinstance(value, list) and len(value) == 2)):
            raise ValueError(f"not a few-row plan entry: {key}: {value}")
        recipe = None if value is None else FewRowRecipe(int(value[0]), bool(value[1]))
        choices[(int(out), int(inp), int(rows), bias == "True")] = recipe
    return choices


VERIFY_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)  # new positions per forward: one row, blocks, small batches
VERIFY_CONTEXT = 256  # cache length the forwards run on


@torch.no_grad()
def measure_verify_costs(target: Any, drafter: Any = None, rows: tuple[int, ...] = VERIFY_ROWS,
                         context: int = VERIFY_CONTEXT, repeats: int = 5) -> VerifyCosts:
    """Seconds of one forward of ``target`` over n new positions on a ``context``-token cache, for each n in
    ``rows`` (the median of ``repeats``), with the products routed as the decode loop routes them (``drafter``'s
    ``few_row_matmul_on_cpu``): what a step verifying n - 1 drafts costs on this machine, in this dtype.

    Set ``drafter.verify_costs`` to the result and ``drafter.num_speculative_tokens = "auto"`` to have each step
    verify the number of drafts that maximises expected tokens per second."""
    from transformers import DynamicCache

    from ..core.matmul_dflash import few_row_products, routed_linears
    from ..core.transformers_compat import forward_cache_kwarg

    device, cache_kwarg = target.device, forward_cache_kwarg(target)
    setting = True if drafter is None else getattr(drafter, "few_row_matmul_on_cpu", True)
    vocab = int(target.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (1, context + max(rows)), generator=torch.Generator().manual_seed(0)).to(device)

    def prefilled() -> Any:
        cache = DynamicCache(config=target.config)
        target(input_ids=ids[:, :context], use_cache=True, **{cache_kwarg: cache})
        return cache

    def timed(cache: Any, n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        target(input_ids=ids[:, context : context + n], use_cache=True, **{cache_kwarg: cache})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    seconds: dict[int, float] = {}
    with routed_linears(target, device, setting), few_row_products(device, setting):
        cache = prefilled()
        croppable = not has_linear_attention(cache) and uncroppable_cache_problem(cache) is None
        for n in rows:
            times = []
            for _ in range(repeats + 1):  # the first run warms the plan's choice for this shape up
                cache = cache if croppable else prefilled()
                times.append(timed(cache, n))
                if croppable:
                    crop_cache(cache, n)
            seconds[n] = sorted(times[1:])[len(times[1:]) // 2]
    return VerifyCosts(seconds)


def target_key(target: Any) -> str:
    """What a target forward's cost depends on: the model, its shapes and dtype."""
    c = target.config.get_text_config()
    return (f"{type(target).__name__}-hidden{c.hidden_size}-layers{c.num_hidden_layers}-mlp"
            f"{getattr(c, 'intermediate_size', 0)}-vocab{c.vocab_size}-{dtype_name(target.dtype)}"
            f"-{target.device.type}")


@dataclass
class Calibration:
    """The cached measurements of one machine (``path``), as read at the start of a command.

    ``few_row`` maps a plan key ``(out, in, rows, bias)`` to its recipe (None for BLAS); ``drafter_dtypes`` maps ``drafter_key`` to ``{"dtype": name, "timings_ms": {name: ms}}``.
    """

    path: Path
    few_row: dict[ShapeKey, FewRowRecipe | None] = field(default_factory=dict)
    drafter_dtypes: dict[str, dict] = field(default_factory=dict)
    verify_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # target_key -> {rows: ms}
    loaded_from_disk: bool = False
    unsaved: bool = False  # a drafter dtype measured since loading (plan choices are compared in ``record``)
    probe_s: float = 0.0  # wall time this process spent measuring drafter dtypes (the plan keeps its own)

    @classmethod
    def load(cls, path: Path | None = None, refresh: bool | None = None) -> "Calibration":
        """The cached file for this machine, or an empty calibration where there is none, it is unreadable, or
        ``refresh`` (default: ``DFLASH_HF_RECALIBRATE``) asks to measure again."""
        path = calibration_path() if path is None else Path(path)
        refresh = recalibration_requested() if refresh is None else refresh
        if refresh or not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            few_row, dtypes = _decode_few_row(data["few_row"]), dict(data["drafter_dtypes"])
            verify_ms = {str(k): {str(r): float(ms) for r, ms in dict(v).items()}
                         for k, v in dict(data.get("verify_ms", {})).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(path)  # a damaged cache is measured again and rewritten, never trusted
        return cls(path, few_row, dtypes, verify_ms, loaded_from_disk=True)

    def prime(self, plan: FewRowPlan | None = None) -> int:
        """Fill ``plan`` (default: this process's measured plan) with the cached choices; how many it took."""
        plan = matmul_dflash.measured_plan() if plan is None else plan
        if not isinstance(plan, FewRowPlan):  # a plan that measures nothing (matmul_dflash.AlwaysRoutine)
            return 0
        missing = {key: recipe for key, recipe in self.few_row.items() if key not in plan.choices}
        plan.choices.update(missing)
        return len(missing)

    def record(self, plan: FewRowPlan | None = None) -> int:
        """Take ``plan``'s choices into this calibration; how many were new."""
        plan = matmul_dflash.measured_plan() if plan is None else plan
        if not isinstance(plan, FewRowPlan):
            return 0
        before = len(self.few_row)
        for key, recipe in list(plan.choices.items()):
            self.few_row.setdefault(key, recipe)
        return len(self.few_row) - before

    def save(self) -> None:
        """Write this calibration to ``path`` atomically (a reader sees the old file or the new one)."""
        payload = {"machine": machine_identity(), "few_row": _encode_few_row(self.few_row),
                   "drafter_dtypes": self.drafter_dtypes, "verify_ms": self.verify_ms}
        atomic_write_text(self.path, json.dumps(payload, indent=1) + "\n")
        self.unsaved = False

    def fastest_drafter_dtype(self, target: Any, drafter: Any) -> tuple[torch.dtype, dict[torch.dtype, float], bool]:
        """``(dtype, timings in seconds, cached)``: ``draft_precision.fastest_drafter_dtype``, measured once per
        machine and drafter shape and then read from this calibration."""
        from .draft_precision import fastest_drafter_dtype

        key = drafter_key(target, drafter)
        cached = self.drafter_dtypes.get(key)
        if cached is not None:
            try:
                timings = {getattr(torch, name): ms / 1e3 for name, ms in cached["timings_ms"].items()}
                return getattr(torch, cached["dtype"]), timings, True
            except (AttributeError, KeyError, TypeError):
                pass  # unreadable entry: measure again below
        started = time.perf_counter()
        dtype, timings = fastest_drafter_dtype(target, drafter)
        self.probe_s += time.perf_counter() - started
        if timings:  # a pair with no choice measures nothing and needs no entry
            self.unsaved = True
            self.drafter_dtypes[key] = {"dtype": dtype_name(dtype),
                                        "timings_ms": {dtype_name(d): round(s * 1e3, 4) for d, s in timings.items()}}
        return dtype, timings, False


    def verify_costs(self, target: Any, drafter: Any = None) -> tuple[VerifyCosts, bool]:
        """``(costs, cached)``: ``measure_verify_costs`` once per machine and target, then read from here."""
        key = target_key(target)
        cached = self.verify_ms.get(key)
        if cached:
            try:
                return VerifyCosts({int(r): ms / 1e3 for r, ms in cached.items()}), True
            except (ValueError, TypeError):
                pass  # unreadable entry: measure again below
        started = time.perf_counter()
        costs = measure_verify_costs(target, drafter)
        self.probe_s += time.perf_counter() - started
        self.verify_ms[key] = {str(r): round(s * 1e3, 4) for r, s in costs.seconds.items()}
        self.unsaved = True
        return costs, False


__all__ = ["RECALIBRATE_ENV", "Calibration", "calibration_path", "drafter_key", "machine_identity",
           "measure_verify_costs", "recalibration_requested", "target_key"]
