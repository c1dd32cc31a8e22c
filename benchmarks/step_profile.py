"""Where the milliseconds of one DFlash step go, on the default pair, next to one plain token.

Timers wrap the pieces of the decode loop (the drafter's layers, its LM head, the target's verify forward, score
processing, acceptance, tap collection, cache crop); what the loop's own step timers count beyond them is its
host work (commit, masks, bookkeeping). Plain ``generate`` runs the same prompts, interleaved prompt by prompt, for
the per-token cost the step is compared against. Greedy, float32 unless told, the shipped drafter with its shipped
drafts per step. Timers add a few microseconds per wrapped call; run on an idle machine. The last line is the
one-time cost of the few-row plan (``FewRowPlan``) in this process.

``--compare-full-block`` also decodes each prompt once more with the drafter's last layer running every block slot
(what the drafter did before ``output_slots``: only the verified slots need it) and prints both drafter-layer costs
per step, measured side by side on the same prompts.

``--dtype bfloat16`` profiles a bfloat16 target (and drafter); ``--drafter-dtype bfloat16`` alone profiles a
bfloat16 drafter of the float32 target (what ``--drafter-dtype auto`` picks where it measures faster).

    python benchmarks/step_profile.py [--num-prompts 4] [--max-new-tokens 96] [--compare-full-block]
        [--dtype float32|bfloat16] [--drafter-dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from typing import Any, Callable

import torch

import dflash_hf.core.generation_dflash as loop
import dflash_hf.core.matmul_dflash as matmul
from dflash_hf.core.verify_dflash import BatchProcessorView, BlockVerifier
from dflash_hf.machine import describe_cpu, dtype_name
from dflash_hf.tools.bench import load_prompt_file
from dflash_hf.training.data import chat_prompt_ids
from dflash_hf.training.default_pair import load_default_pair

spent: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable[..., Any], counts: Callable[[], bool] = lambda: True) -> Callable[..., Any]:
    """``fn``, adding its seconds to ``spent[name]`` whenever ``counts()`` holds at the call."""

    @functools.wraps(fn)  # keeps the signature: the loop and generate inspect forward's for the cache keyword
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if counts():
                spent[name] += time.perf_counter() - start

    return wrapper


def full_block(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The drafter's forward as it was before ``output_slots``: every slot through the last layer, then sliced."""

    @functools.wraps(forward)
    def run(*args: Any, output_slots: slice | None = None, **kwargs: Any) -> Any:
        hidden = forward(*args, **kwargs)
        return hidden if output_slots is None else hidden[:, output_slots]

    return run


FULL_BLOCK = "draft: drafter layers, every slot through the last layer"


def install_timers(target: Any, drafter: Any) -> dict:
    """Wrap each piece once; returns the state the caller sets per generate call (``calls=0`` and ``plain``). A
    target forward is a prefill when it is the first of its call; in plain calls the others are decode forwards.
    The verify pieces the prefill also runs (scores, acceptance of its token, taps) count only after it."""
    state = {"calls": 0, "plain": False}
    after_prefill = lambda: state["calls"] > 1  # noqa: E731
    drafter.forward = timed("draft: drafter layers", drafter.forward)
    loop.DraftSession.draft_logits = timed("draft: LM head (draft vocabulary)", loop.DraftSession.draft_logits)
    loop.DraftSession.propose = timed("draft: propose (layers + head + inputs)", loop.DraftSession.propose)
    BatchProcessorView.block_scores = timed("verify: score processing", BatchProcessorView.block_scores,
                                            after_prefill)
    BlockVerifier.verify = timed("verify: acceptance", BlockVerifier.verify, after_prefill)
    loop.TapRecorder.take = timed("verify: taps collected", loop.TapRecorder.take, after_prefill)
    loop.crop_cache = timed("verify: cache crop", loop.crop_cache)
    forward = target.forward

    @functools.wraps(forward)
    def target_forward(*args: Any, **kwargs: Any) -> Any:
        state["calls"] += 1
        if state["plain"]:
            name = "plain: prefill" if state["calls"] == 1 else "plain: decode forward"
        else:
            name = "prefill" if state["calls"] == 1 else "verify: target forward"
        return timed(name, forward)(*args, **kwargs)

    target.forward = target_forward
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--compare-full-block", action="store_true",
                        help="also time the drafter with every block slot through its last layer")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the target's dtype")
    parser.add_argument("--drafter-dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: the target's")
    args = parser.parse_args()
    drafter_dtype = getattr(torch, args.drafter_dtype or args.dtype)
    target, tokenizer, drafter = load_default_pair(getattr(torch, args.dtype), drafter_dtype=drafter_dtype)
    prompts = [torch.tensor([chat_prompt_ids(tokenizer, p)]) for p in load_prompt_file(None, args.num_prompts)]
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    plan = matmul.measured_plan()  # the few-row plan DFlash's forwards consult: its one-time cost is printed too
    plan.measure = timed("few-row plan timing", plan.measure)
    target.generate(prompts[0], assistant_model=drafter, **{**common, "max_new_tokens": 16})  # warm-up
    target.generate(prompts[0], **{**common, "max_new_tokens": 4})
    if args.compare_full_block:  # its own few-row products get their plan entries here, not inside its timer
        shipped_forward, drafter.forward = drafter.forward, full_block(drafter.forward)
        target.generate(prompts[0], assistant_model=drafter, **{**common, "max_new_tokens": 16})
        drafter.forward = shipped_forward
    warm_up = (len(plan.choices), spent["few-row plan timing"])
    full_block_forward = timed(FULL_BLOCK, full_block(drafter.forward))
    state = install_timers(target, drafter)
    accepted: list[int] = []
    full_block_steps = 0
    plain_tokens = 0
    draft_s = verify_s = plain_s = 0.0
    for ids in prompts:
        state.update(calls=0, plain=False)
        target.generate(ids, assistant_model=drafter, **common)
        stats = drafter.last_stats
        accepted += stats.acceptance_lengths
        draft_s += stats.draft_time_s
        verify_s += stats.verify_time_s
        if args.compare_full_block:  # once more, only the drafter's layers counted
            others, shipped_forward = dict(spent), drafter.forward
            drafter.forward = full_block_forward
            target.generate(ids, assistant_model=drafter, **common)
            drafter.forward = shipped_forward
            full_block_steps += len(drafter.last_stats.acceptance_lengths)
            spent.update({name: seconds for name, seconds in others.items() if name != FULL_BLOCK})
        state.update(calls=0, plain=True)
        start = time.perf_counter()
        out = target.generate(ids, **common)
        plain_s += time.perf_counter() - start
        plain_tokens += out.shape[1] - ids.shape[1] - 1  # the first token comes from the prefill
    steps = len(accepted)
    plain_s -= spent["plain: prefill"]  # prefills are left out of both: the step is what is compared
    rows = [
        ("draft: drafter layers", spent["draft: drafter layers"]),
        ("draft: LM head (draft vocabulary)", spent["draft: LM head (draft vocabulary)"]),
        ("draft: the rest of propose (block inputs, positions)", spent["draft: propose (layers + head + inputs)"]
         - spent["draft: drafter layers"] - spent["draft: LM head (draft vocabulary)"]),
        ("draft: outside propose (argmax, device moves)", draft_s - spent["draft: propose (layers + head + inputs)"]),
        ("verify: target forward", spent["verify: target forward"]),
        ("verify: score processing", spent["verify: score processing"]),
        ("verify: acceptance", spent["verify: acceptance"]),
        ("verify: taps collected", spent["verify: taps collected"]),
        ("verify: cache crop", spent["verify: cache crop"]),
    ]
    accounted = sum(seconds for name, seconds in rows if name.startswith("verify"))
    rows.append(("verify: the loop's own host work (commit, masks, stops)", verify_s - accounted))
    step_ms = 1e3 * (draft_s + verify_s) / steps
    plain_ms = 1e3 * plain_s / max(1, plain_tokens)
    print(f"CPU: {describe_cpu()}; {torch.get_num_threads()} threads; {args.dtype} target, "
          f"{dtype_name(drafter_dtype)} drafter; {len(prompts)} "
          f"prompts, {steps} DFlash steps, mean acceptance {sum(accepted) / steps:.2f}")
    print(f"{'piece':<58}{'ms/step':>9}{'% of step':>11}")
    for name, seconds in rows:
        ms = 1e3 * seconds / steps
        print(f"{name:<58}{ms:>9.2f}{100 * ms / step_ms:>10.1f}%")
    print(f"{'one DFlash step (draft + verify)':<58}{step_ms:>9.2f}{100.0:>10.1f}%")
    print(f"{'one plain token (prefill excluded), same prompts':<58}{plain_ms:>9.2f}"
          f"   step = {step_ms / plain_ms:.2f}x a plain token")
    print(f"{'  of which the plain decode forward':<58}{1e3 * spent['plain: decode forward'] / plain_tokens:>9.2f}")
    if full_block_steps:
        print(f"drafter layers per step: {1e3 * spent['draft: drafter layers'] / steps:.2f} ms with only the verified "
              f"slots through the last layer, {1e3 * spent[FULL_BLOCK] / full_block_steps:.2f} ms with every slot "
              f"({full_block_steps} steps), same prompts, interleaved")
    print(f"few-row plan: {len(plan.choices)} products timed in {spent['few-row plan timing']:.2f} s in all, "
          f"{warm_up[0]} of them ({warm_up[1]:.2f} s) in the 16-token warm-up call")


if __name__ == "__main__":
    main()
