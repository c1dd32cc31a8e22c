"""Benchmark the fused verification kernels against the torch reference.

    python -m dflash_hf.kernels.bench_verify [--batches 1,8,64] [--block 16] [--vocab 151936] [--graph]
                                             [--peak-gbps 4800] [--json OUT] [--smoke]

For every (mode, backend, batch) it reports the median µs per call (CUDA events, after warmup) and the achieved
bandwidth = bytes of input logits / time, against ``--peak-gbps`` (H200 HBM3e: 4800 GB/s). Bytes are the logit
tensors a verifier must read at least once: target [R, T, V] (+ draft [R, T-1, V] for ratio); the ideal time is
bytes / peak. Every row of the batch carries a full block of T-1 drafts (worst case: all slots are live).

By default the L2 cache is flushed before every timed call (at batch 1 the logits fit in H200's 50 MB L2, which
would flatter the bandwidth); ``--no-flush-l2`` keeps it warm (the logits were just written by the LM head in real
use). ``--graph`` times a CUDA-graph replay instead of eager launches (no Python launch overhead).

Without CUDA the benchmark cannot run: it says so and exits 0; ``--smoke`` then runs a tiny interpreter check
(TRITON_INTERPRET=1) of every kernel against the reference instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch

from .keyed_random import STREAM_DRAFT, STREAM_TARGET

MODES = ("greedy", "strict", "ratio")
_CHILD_FLAG = "_DFLASH_HF_BENCH_SMOKE_CHILD"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dflash_hf.kernels.bench_verify", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes R (default 1,8,64)")
    ap.add_argument("--block", type=int, default=16, help="block size T = drafts + 1 (default 16)")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (default 151936, Qwen)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of greedy,strict,ratio")
    ap.add_argument("--backends", default="triton,torch", help="comma-separated subset of triton,torch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30, help="timed calls per triton case")
    ap.add_argument("--ref-reps", type=int, default=5, help="timed calls per torch-reference case (it is slow)")
    ap.add_argument("--peak-gbps", type=float, default=4800.0, help="peak memory bandwidth, GB/s (H200: 4800)")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (triton backend only)")
    ap.add_argument("--no-flush-l2", action="store_true", help="do not flush L2 between timed calls")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--smoke", action="store_true", help="without CUDA: run a tiny interpreter smoke test")
    args = ap.parse_args(argv)
    for mode in args.modes.split(","):
        if mode and mode not in MODES:
            ap.error(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for backend in args.backends.split(","):
        if backend and backend not in ("triton", "torch"):
            ap.error(f"unknown backend {backend!r} (choose from triton, torch)")
    return args


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _make_case(
    mode: str, R: int, T: int, V: int, dtype: torch.dtype, device: str, num_drafts: list[int] | None = None
) -> dict[str, Any]:
    """Random inputs; by default every draft slot is live (num_drafts = T-1) and the drafts are mostly accepted."""
    gen = torch.Generator(device=device).manual_seed(0)
    target = (3.0 * torch.randn(R, T, V, generator=gen, device=device)).to(dtype)
    nd = torch.tensor(num_drafts if num_drafts is not None else [T - 1] * R, dtype=torch.int64, device=device)
    positions = torch.arange(R, dtype=torch.int64, device=device) * 4096
    case: dict[str, Any] = {"target_logits": target, "num_drafts": nd, "seed": 1234, "positions": positions}
    if mode == "greedy":
        case["draft_tokens"] = target[:, : T - 1].float().argmax(-1)
    elif mode == "strict":
        case["draft_tokens"] = _sample(target, 1234, positions, STREAM_TARGET)[:, : T - 1].contiguous()
    else:
        draft = (target[:, : T - 1].float() + 0.5 * torch.randn(R, T - 1, V, generator=gen, device=device)).to(dtype)
        case["draft_logits"] = draft
        case["draft_tokens"] = _sample(draft, 1234, positions, STREAM_DRAFT)
    return case


def _sample(logits: torch.Tensor, seed: int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Keyed samples with whichever backend suits the device (the reference is slow on big GPU batches)."""
    from .dispatch import sample_keyed

    return sample_keyed(logits, seed, positions, stream)


def _call(module: Any, mode: str, case: dict[str, Any]) -> Callable[[], Any]:
    t, d, n = case["target_logits"], case["draft_tokens"], case["num_drafts"]
    if mode == "greedy":
        return lambda: module.greedy_verify(t, d, n)
    if mode == "strict":
        return lambda: module.strict_verify(t, d, n, case["seed"], case["positions"])
    return lambda: module.ratio_verify(t, case["draft_logits"], d, n, case["seed"], case["positions"])


def _logit_bytes(mode: str, R: int, T: int, V: int, dtype: torch.dtype) -> int:
    elem = torch.finfo(dtype).bits // 8
    rows = R * T + (R * (T - 1) if mode == "ratio" else 0)
    return rows * V * elem


def _time_cuda(fn: Callable[[], Any], warmup: int, reps: int, flush: torch.Tensor | None, graph: bool) -> float:
    """Median µs per call, measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # allocations made before capture
            with torch.cuda.graph(g, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        fn = g.replay
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def _print_table(rows: list[dict[str, Any]], peak: float) -> None:
    head = (
        f"{'mode':<7} {'backend':<7} {'batch':>5} {'MB read':>9} {'µs/call':>10} {'GB/s':>8} {'% peak':>7} "
        f"{'ideal µs':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['mode']:<7} {r['backend']:<7} {r['batch']:>5} {r['bytes'] / 1e6:>9.2f} {r['us']:>10.1f} "
            f"{r['gbps']:>8.0f} {100 * r['gbps'] / peak:>6.1f}% {r['ideal_us']:>9.1f}"
        )


def _smoke() -> int:
    """Tiny interpreter run: every Triton kernel against the reference on CPU tensors."""
    from . import reference

    try:
        from . import triton_verify
    except ImportError as exc:
        print(f"smoke: triton is not importable ({exc}); nothing to check")
        return 0
    if not triton_verify.interpreter_active():
        # Importing dflash_hf (transformers) already imported triton in compiled mode, and TRITON_INTERPRET is
        # only honoured at triton's first import: rerun this smoke test in a fresh interpreter-mode process.
        if os.environ.get(_CHILD_FLAG):
            print("smoke: could not enable the Triton interpreter")
            return 1
        env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
        return subprocess.call([sys.executable, "-m", "dflash_hf.kernels.bench_verify", "--smoke"], env=env)
    # The residual pass takes log(0) = -inf on purpose; numpy (the interpreter) warns about it.
    warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
    R, T, V = 2, 4, 64
    case = {m: _make_case(m, R, T, V, torch.float32, "cpu", num_drafts=[T - 1, 1]) for m in MODES}
    print(f"smoke (TRITON_INTERPRET=1, CPU): R={R} T={T} V={V}")
    ok = True
    for mode in MODES:
        results = {}
        for name, module in (("torch", reference), ("triton", triton_verify)):
            t0 = time.perf_counter()
            results[name] = _call(module, mode, case[mode])()
            print(f"  {mode:<7} {name:<7} {1e3 * (time.perf_counter() - t0):8.1f} ms  "
                  f"accepted={results[name][0].tolist()} next={results[name][1].tolist()}")
        same = all(torch.equal(a, b) for a, b in zip(results["torch"], results["triton"]))
        ok &= same
        print(f"  {mode:<7} triton == torch: {same}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        if not os.environ.get(_CHILD_FLAG):
            print("CUDA is not available: the verification benchmark needs a GPU.")
        if args.smoke:
            return _smoke()
        print("(pass --smoke for a tiny TRITON_INTERPRET=1 correctness run on CPU)")
        return 0

    from . import reference

    try:
        from . import triton_verify
    except ImportError as exc:
        triton_verify = None
        print(f"triton is not importable ({exc}): benchmarking the torch reference only")

    dtype = _DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    backends = [b for b in args.backends.split(",") if b and not (b == "triton" and triton_verify is None)]
    T, V = args.block, args.vocab
    flush = None if args.no_flush_l2 else torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}  dtype={args.dtype}  T={T}  V={V}  peak={args.peak_gbps:.0f} GB/s"
          f"  graph={args.graph}  flush_l2={flush is not None}")

    rows: list[dict[str, Any]] = []
    for mode in modes:
        for R in batches:
            case = _make_case(mode, R, T, V, dtype, "cuda")
            nbytes = _logit_bytes(mode, R, T, V, dtype)
            for backend in backends:
                module = triton_verify if backend == "triton" else reference
                fn = _call(module, mode, case)
                reps = args.reps if backend == "triton" else args.ref_reps
                us = _time_cuda(fn, args.warmup if backend == "triton" else 1, reps, flush,
                                args.graph and backend == "triton")
                rows.append({
                    "mode": mode, "backend": backend, "batch": R, "block": T, "vocab": V, "dtype": args.dtype,
                    "bytes": nbytes, "us": us, "gbps": nbytes / (us * 1e-6) / 1e9,
                    "ideal_us": nbytes / (args.peak_gbps * 1e9) * 1e6, "graph": args.graph and backend == "triton",
                })  # fmt: skip
            del case
            torch.cuda.empty_cache()
    _print_table(rows, args.peak_gbps)
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
            "peak_gbps": args.peak_gbps,
            "flush_l2": flush is not None,
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
