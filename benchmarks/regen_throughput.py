"""Regeneration throughput: a real vLLM server against local batched ``generate``, on the same prompts.

Both write the default target's greedy answers to the same held-out prompts, at the same dtype and on the same CPU:

- vLLM: ``vllm serve TARGET`` (from ``$DFLASH_VLLM_PYTHON``'s venv, see scripts/make_vllm_venv.sh), driven by
  ``dflash_hf.training.data.openai_responses`` (token-id prompts, token ids back, ``--concurrency`` requests in flight);
- local: ``dflash_hf.training.data.generate_responses`` (batched, left-padded ``generate``, ``--batch-size`` rows per call).

The server's start-up time (process start to ``/health``) is measured too, and not counted in its tokens/s.
The server is stopped before the local run, so the two never share the CPU.

    bash scripts/make_vllm_venv.sh && export DFLASH_VLLM_PYTHON=$PWD/.vllm-venv/bin/python
    python benchmarks/regen_throughput.py [--num-prompts 12] [--max-new-tokens 128] [--batch-size 12]
        [--dtype float32] [--compile] [--speculative-config JSON] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dflash_hf.machine import cpu_facts
from dflash_hf.training.data import generate_responses, openai_responses
from dflash_hf.training.default_pair import default_target_folder, load_default_target
from dflash_hf.training.vllm_server import (
    MAKE_VENV_SCRIPT,
    VLLM_PYTHON_ENV,
    VLLMServer,
    server_environment,
    vllm_python,
)

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "dflash_hf" / "assets" / "bench_prompts.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=12, help="held-out bench prompts to answer")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=12, help="rows per local generate call")
    parser.add_argument("--concurrency", type=int, help="requests in flight to vLLM (default: --batch-size)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM torch.compile the model (default: --enforce-eager, a much shorter start-up)")
    parser.add_argument("--speculative-config", help="passed to vllm serve, e.g. a DFlash drafter's JSON")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the server to come up")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def load_prompts(count: int) -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    if count > len(prompts):
        raise SystemExit(f"--num-prompts {count}: {PROMPTS_FILE.name} holds {len(prompts)} prompts")
    return prompts[:count]


def server_argv(args: argparse.Namespace) -> list[str]:
    argv = ["vllm", "serve", str(default_target_folder()), "--dtype", args.dtype, "--max-model-len", "1024"]
    if not args.compile:
        argv.append("--enforce-eager")
    if args.speculative_config:
        argv += ["--speculative-config", args.speculative_config]
    return argv


def run_vllm(args: argparse.Namespace, python: Path, tokenizer, prompts: list[str], log: Path) -> dict:
    env = {**server_environment(python, threads=f"0-{(os.cpu_count() or 1) - 1}"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = VLLMServer(python, server_argv(args), log, env=env)
    server.start(args.start_timeout)
    try:
        print(f"vLLM up in {server.startup_s:.1f} s (log: {log})", flush=True)
        started = time.perf_counter()
        records = list(openai_responses(server.base_url, None, tokenizer, prompts, args.max_new_tokens,
                                        concurrency=args.concurrency or args.batch_size))
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    return {"records": records, "seconds": seconds, "startup_s": server.startup_s}


def run_local(args: argparse.Namespace, target, tokenizer, prompts: list[str]) -> dict:
    started = time.perf_counter()
    records = list(generate_responses(target, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size))
    return {"records": records, "seconds": time.perf_counter() - started}


def new_tokens(records: list[dict]) -> int:
    return sum(len(r["input_ids"]) - r["prompt_len"] for r in records)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = vllm_python()
    if python is None:
        raise SystemExit(f"set {VLLM_PYTHON_ENV} to vLLM's venv python (bash {MAKE_VENV_SCRIPT}).")
    cpu = cpu_facts()
    print(f"CPU: {cpu['cpu_model']} (family {cpu['cpu_family']}, model {cpu['cpu_model_number']}, "
          f"{cpu['logical_cpus']} logical CPUs, avx512_bf16 {cpu['avx512_bf16']}); torch threads "
          f"{torch.get_num_threads()}", flush=True)
    prompts = load_prompts(args.num_prompts)
    target, tokenizer = load_default_target(getattr(torch, args.dtype))
    with tempfile.TemporaryDirectory() as scratch:
        served = run_vllm(args, python, tokenizer, prompts, Path(scratch) / "vllm.log")
    local = run_local(args, target, tokenizer, prompts)
    rows = {"vLLM server": served, "local generate": local}
    same = sum(a["input_ids"] == b["input_ids"] for a, b in zip(served["records"], local["records"]))
    print(f"\n{args.num_prompts} prompts, {args.max_new_tokens} new tokens at most, {args.dtype}, greedy; "
          f"local batch {args.batch_size}, vLLM concurrency {args.concurrency or args.batch_size}"
          f"{', ' + args.speculative_config if args.speculative_config else ''}")
    print(f"{'method':<16} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    results = {}
    for name, run in rows.items():
        tokens = new_tokens(run["records"])
        results[name] = {"new_tokens": tokens, "seconds": round(run["seconds"], 2),
                         "tokens_per_s": round(tokens / run["seconds"], 2)}
        print(f"{name:<16} {tokens:>7} {run['seconds']:>8.1f} {tokens / run['seconds']:>9.1f}")
    ratio = results["vLLM server"]["tokens_per_s"] / results["local generate"]["tokens_per_s"]
    print(f"vLLM / generate: {ratio:.2f}x; identical answers: {same}/{len(prompts)}; "
          f"vLLM start-up {served['startup_s']:.1f} s ({'compiled' if args.compile else 'eager'})")
    if args.out:
        summary = {"command": "python benchmarks/regen_throughput.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
                   "cpu": cpu, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results,
                   "ratio": round(ratio, 3), "identical_answers": same, "startup_s": round(served["startup_s"], 1)}
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
