"""CPU cost of a linear layer over a few rows: BLAS's ``x @ W^T`` against DFlash's ``W @ x^T`` routine.

Why it matters: on CPU a DFlash verify step runs the target over 2-8 rows, and plain decoding over 1. This prints,
for the weight shapes of SmolLM2-135M (the default target) and 1-16 rows, the median time of ``F.linear`` and of
``dflash_hf.core.matmul_dflash.linear_for_few_rows``, measured side by side in one run, and their ratio. Weights
are cycled through several copies so that every product streams its weight from memory, as in a real forward.

The bfloat16 column is BLAS's product with the weight and the rows in bfloat16, what a bfloat16 drafter pays
(``--drafter-dtype auto`` picks that dtype where whole drafts measure clearly faster in it).

The plan column is what the few-row plan (``FewRowPlan``, which DFlash's forwards consult) chooses on this machine
from its own short timing, taken here as a generate call would take it: BLAS, or the routine over ``rN`` rows
(zero rows pad the product up to N where that measured faster), with a channels-last copy of the result where
marked ``cl``; the plan's own timing of BLAS and of its fastest recipe is printed too. Run it on an idle machine.

    python benchmarks/cpu_linear.py [--rows 1 2 4 8 16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dflash_hf.core.matmul_dflash import FEW_ROWS, FewRowPlan, FewRowRecipe, linear_for_few_rows
from dflash_hf.machine import describe_cpu

# (out_features, in_features) of SmolLM2-135M: q/o, k/v, gate/up, down, LM head.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
WEIGHT_POOL_BYTES = 256 * 2**20


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2]


def describe(recipe: FewRowRecipe | None) -> str:
    """The plan's choice in a few letters: BLAS, or the routine's rows and copy (``r8 cl``)."""
    return "BLAS" if recipe is None else f"r{recipe.rows}{' cl' if recipe.channels_last else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    plan = FewRowPlan()
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"{'weight':>12} {'rows':>5} {'x @ W^T (us)':>14} {'W @ x^T (us)':>14} {'ratio':>7} {'plan':>10}"
          f" {'plan timing: BLAS / best routine (us)':>38} {'bfloat16 x @ W^T (us)':>22}")
    for out_features, in_features in SHAPES:
        copies = max(2, min(64, WEIGHT_POOL_BYTES // (out_features * in_features * 4)))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        halves = [w.to(torch.bfloat16) for w in weights]  # as many copies: each product streams from memory too
        turn = iter(range(10**9))

        def weight() -> torch.Tensor:
            return weights[next(turn) % copies]

        def half_weight() -> torch.Tensor:
            return halves[next(turn) % len(halves)]

        for rows in args.rows:
            x = torch.randn(rows, in_features)
            blas = median_us(lambda: F.linear(x, weight()), args.repeats)
            ours = median_us(lambda: linear_for_few_rows(x, weight()), args.repeats)
            x16 = x.to(torch.bfloat16)
            half = median_us(lambda: F.linear(x16, half_weight()), args.repeats)
            choice, timing = "-", ""
            if rows in FEW_ROWS:
                recipe = plan.recipe_for(weight(), rows, None)
                choice = describe(recipe)
                seconds = plan.timings[(out_features, in_features, rows, False)]
                fastest = min(seconds[way] for way in seconds if way is not None)
                timing = f"{1e6 * seconds[None]:.0f} / {1e6 * fastest:.0f}"
            print(f"{out_features:>6}x{in_features:<5} {rows:>5} {blas:>14.0f} {ours:>14.0f} {blas / ours:>6.2f}x "
                  f"{choice:>10} {timing:>38} {half:>22.0f}", flush=True)


if __name__ == "__main__":
    main()
