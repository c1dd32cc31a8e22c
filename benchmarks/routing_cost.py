"""What reaching the few-row routine costs: a torch function mode against direct calls, on the default pair.

The routine used to be reached through a ``TorchFunctionMode``, which runs a Python callback for every op of a
forward; now the drafter's layers are ``FewRowLinear`` and the target's plain linear layers are routed only while
a DFlash generate runs (``routed_linears``). This times, interleaved, the median of ``--repeats``:

- a 4-token target forward (a verify block) after a 300-token prefill: BLAS alone, BLAS under an empty mode, the
  routine through a mode (the previous way, rebuilt here), the routine by direct calls (now);
- the drafter's forward on the draft inputs of a real decode (2 prompts), through the mode and direct.

Both ways take the same products (one plan), so the differences are the dispatch alone. Float32, 2 threads.

    python benchmarks/routing_cost.py [--repeats 25]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

import dflash_hf.core.matmul_dflash as matmul
from dflash_hf.core.cache_dflash import crop_cache
from dflash_hf.core.transformers_compat import cache_from_output, forward_cache_kwarg
from dflash_hf.machine import describe_cpu
from dflash_hf.tools.bench import load_prompt_file
from dflash_hf.training.data import chat_prompt_ids
from dflash_hf.training.default_pair import load_default_pair


class EmptyMode(TorchFunctionMode):
    """A mode that changes nothing: its cost is the callback on every op."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


class RoutineMode(TorchFunctionMode):
    """The previous way in: every F.linear the plan favours goes to the routine, seen through the mode."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.nn.functional.linear:
            bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
            recipe = matmul.routine_recipe(matmul.measured_plan(), args[0], args[1], bias)
            if recipe is not None:
                return matmul.linear_for_few_rows(args[0], args[1], bias, recipe)
        return func(*args, **(kwargs or {}))


def direct() -> contextlib.AbstractContextManager:
    return matmul.few_row_products(torch.device("cpu"), True)


def medians(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    for run in variants.values():  # warm-up: the plan's timings and the caches
        run(), run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def target_forwards(target: Any, repeats: int) -> dict[str, float]:
    ids = torch.randint(100, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
    cache_kwarg = forward_cache_kwarg(target)
    with torch.no_grad():
        cache = cache_from_output(target(input_ids=ids, use_cache=True))

    def forward(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            with torch.no_grad(), context():
                target(input_ids=ids[:, -4:], use_cache=True, **{cache_kwarg: cache})
            seconds = time.perf_counter() - start
            crop_cache(cache, 4)
            return 1e3 * seconds
        return run

    with matmul.routed_linears(target, torch.device("cpu")):  # routed layers with no plan current compute exactly as BLAS does
        return medians({"BLAS": forward(contextlib.nullcontext), "BLAS, empty mode": forward(EmptyMode),
                        "routine through the mode": forward(RoutineMode), "routine, direct calls": forward(direct)},
                       repeats)


def drafter_forwards(target: Any, tokenizer: Any, drafter: Any, repeats: int) -> dict[str, float]:
    captured: list[tuple[tuple, dict]] = []
    forward = drafter.forward

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.append((args, {**kwargs, "cache": copy.deepcopy(kwargs["cache"])}))
        return forward(*args, **kwargs)

    drafter.forward = capture
    for prompt in load_prompt_file(None, 2):
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
        target.generate(ids, assistant_model=drafter, max_new_tokens=64, do_sample=False,
                        pad_token_id=tokenizer.eos_token_id)
    drafter.forward = forward

    def replay(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], float]:
        def run() -> float:
            caches = [copy.deepcopy(kwargs["cache"]) for _, kwargs in captured]
            start = time.perf_counter()
            for (args, kwargs), cache in zip(captured, caches):
                with torch.no_grad(), context():
                    forward(*args, **{**kwargs, "cache": cache})
            return 1e3 * (time.perf_counter() - start) / len(captured)
        return run

    return medians({"routine through the mode": replay(RoutineMode), "routine, direct calls": replay(direct)},
                   repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    target, tokenizer, drafter = load_default_pair()
    print(f"CPU: {describe_cpu()}; {torch.get_num_threads()} threads; medians of {args.repeats}, interleaved")
    for title, results in (("4-token target forward", target_forwards(target, args.repeats)),
                           ("drafter forward (real draft inputs)", drafter_forwards(target, tokenizer, drafter,
                                                                                     args.repeats))):
        print(title)
        for name, ms in results.items():
            print(f"  {name:<28}{ms:>8.2f} ms")


if __name__ == "__main__":
    main()
