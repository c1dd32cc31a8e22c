"""``dflash-hf demo``: one prompt answered with DFlash as it streams, then plain and DFlash timed side by side on it,
with the machine's one-time calibration reported apart from every timing."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TextStreamer

from ..core import matmul_dflash
from ..machine import describe_cpu, dtype_name
from ..training.data import chat_input_ids
from . import bench


def run_demo(target: Any, tokenizer: Any, drafter: Any, prompt: str, *, max_new_tokens: int, repeats: int,
             calibration: Any) -> int:
    """Stream the answer (DFlash's warm-up), then time ``repeats`` runs of plain and DFlash; 0 when lossless."""
    print(f"Machine: {_device_line(target)}; target {dtype_name(target.dtype)}, drafter "
          f"{dtype_name(drafter.dtype)}\n")
    ids = chat_input_ids(tokenizer, prompt, target.device)
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    plan = matmul_dflash.measured_plan()  # looked up at call time: a fresh process's plan, or a test's
    measuring_before = plan.measuring_s
    print(f"> {prompt}\n")
    # The streamed answer is DFlash's warm-up (and where a fresh machine calibrates); the timings come after it.
    target.generate(ids, assistant_model=drafter, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                        skip_special_tokens=True), **common)
    target.generate(ids, **{**common, "max_new_tokens": 8})  # plain's own warm-up
    bench.two_row_forward_ms(target, ids, repeats=1)  # the step-cost analysis's shapes, calibrated here too
    print()
    _report_calibration(calibration, plan, plan.measuring_s - measuring_before)
    timing_measures = plan.measuring_s
    print(f"Timing {repeats} runs of each, plain and DFlash alternating, none streamed (as dflash-hf bench "
          "times them):")
    results = bench.run_bench(target, tokenizer, drafter, [prompt] * repeats, max_new_tokens=max_new_tokens,
                              methods=("plain", "dflash"), warmup=False)
    if plan.measuring_s > timing_measures:  # not expected: the warm-ups met every shape the timed runs meet
        print(f"(the few-row plan met new products while timing: {plan.measuring_s - timing_measures:.2f} s of "
              "the timings were calibration; the next run has them cached)")
    return _print_demo_results(results, repeats)


def _device_line(target: Any) -> str:
    device = next(target.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{describe_cpu()}, {torch.get_num_threads()} threads"


def _report_calibration(calibration: Any, plan: Any, plan_s: float) -> None:
    """Say what this machine's one-time calibration cost, apart from every timing, and where it is cached."""
    new_shapes = calibration.record(plan)
    measured_s = plan_s + calibration.probe_s
    if measured_s > 0:
        calibration.save()
        print(f"One-time calibration: {measured_s:.1f} s (few-row plan: {new_shapes} matmul shapes timed in "
              f"{plan_s:.1f} s during the answer above; drafter dtype probe {calibration.probe_s:.1f} s while "
              f"loading), outside every timing; cached in {calibration.path}, so the next run measures nothing "
              "(--recalibrate measures again)")
    else:
        print(f"Calibration: read from {calibration.path} ({len(calibration.few_row)} few-row plan choices); 0.0 s "
              "spent measuring")


def _print_demo_results(results: dict, repeats: int) -> int:
    dflash, plain = results["methods"]["dflash"], results["methods"]["plain"]
    new_tokens = results["per_prompt"][0]["new_tokens"]
    same = repeats - len(results["mismatched_prompts"]["dflash"])
    print(f"new tokens             : {new_tokens} per run")
    print(f"mean acceptance length : {dflash['mean_acceptance_length']:.2f} tokens per target forward")
    print(f"DFlash                 : {dflash['tokens_per_s']:.1f} tokens/s")
    print(f"plain generate         : {plain['tokens_per_s']:.1f} tokens/s")
    print(f"speedup                : {dflash['speedup']:.2f}x")
    print(f"identical to plain     : {results['lossless']} ({same} of {repeats} runs)")
    step = results["step_cost"]
    if dflash["speedup"] < 1 and step is not None:
        print(f"\nDFlash is slower than plain decoding here. One step (draft {step['draft_ms_per_step']:.1f} ms + "
              f"verify {step['verify_ms_per_step']:.1f} ms) costs {step['break_even_acceptance_length']:.2f} plain "
              f"tokens ({step['plain_ms_per_token']:.1f} ms each), so it pays off only when a step commits more "
              f"than that; this drafter commits {dflash['mean_acceptance_length']:.2f} on this prompt. A drafter "
              "that accepts more, or a machine where verifying a few rows costs little more than one (see "
              "`dflash-hf bench --dtype bfloat16`), is what changes it.")
    return 0 if results["lossless"] else 1
