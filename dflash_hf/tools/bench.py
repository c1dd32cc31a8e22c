"""``dflash-hf bench``: plain greedy vs DFlash vs prompt-lookup, side by side in one process.

The machine this runs on is shared and noisy, so absolute times drift; what we report are ratios measured in the
same run, with the methods alternating prompt by prompt so that drift hits all of them alike. Every DFlash (and
prompt-lookup) output is compared with plain greedy: a mismatch is reported, never hidden.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.cache_dflash import crop_cache
from ..core.matmul_dflash import few_row_products, routed_linears
from ..core.modeling_dflash import DraftCache
from ..core.pair_dflash import max_drafts_per_step
from ..core.transformers_compat import cache_from_output, forward_cache_kwarg
from ..fileio import atomic_write_text, can_plot, save_figure
from ..machine import dtype_name
from ..training.data import chat_input_ids, chat_prompt_ids
from ..training.prompt_sources import default_prompt_file, load_prompt_file  # re-exported: bench's names

PROMPT_LOOKUP_TOKENS = 10  # prompt_lookup_num_tokens of the prompt-lookup method
# How each method is named wherever its results are shown: the bench table and plot, and the model card.
METHOD_LABELS = {
    "plain": "plain generate (no drafter)",
    "dflash": "DFlash (dflash-hf loop)",
    "dflash_lookup": f"DFlash + prompt lookup (n={PROMPT_LOOKUP_TOKENS})",
    "transformers_dflash": "DFlash in transformers' loop",
    "prompt_lookup": f"prompt lookup (n={PROMPT_LOOKUP_TOKENS})",
}


def transformers_has_dflash() -> bool:
    """Whether the installed transformers has its own ``speculation_type="dflash"`` path (5.15 and later)."""
    from transformers.generation import candidate_generator

    return hasattr(candidate_generator, "DFlashTokenCandidateGenerator")


class TransformersDFlashAdapter(torch.nn.Module):
    """Lets transformers' own DFlash candidate generator drive our drafter, for a side-by-side benchmark.

    That generator calls ``assistant(noise_embeds=, context_hidden_states=, position_ids=, attention_mask=,
    cache=|past_key_values=)`` with the context of the newly accepted positions followed by the block, and reads
    ``last_hidden_state``. We run our drafter on its own draft cache and keep transformers' cache (which it crops
    by one block per step) at the length it expects with 1-element stubs. The adapter carries no DFlash marker, so
    our generate patch leaves it to transformers.
    """

    def __init__(self, drafter: Any) -> None:
        import copy

        super().__init__()
        self.drafter = drafter
        self.config = copy.copy(drafter.config)
        del self.config.dflash_config  # read as a raw DFlash checkpoint otherwise (see the generate patch)
        self.generation_config = None
        self.draft_cache = DraftCache()

    @property
    def device(self) -> torch.device:
        return self.drafter.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.drafter.fc.weight.dtype

    def reset(self) -> None:
        self.draft_cache = DraftCache()

    def forward(self, noise_embeds, context_hidden_states, position_ids, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        cache = cache if cache is not None else past_key_values
        num_context = context_hidden_states.shape[1]  # position_ids: [1, context + block]
        hidden = self.drafter(noise_embeds, context_hidden_states, position_ids[:, num_context:],
                              position_ids[:, :num_context], cache=self.draft_cache)
        if cache is not None:
            stub = hidden.new_zeros(1, 1, position_ids.shape[1], 1)
            for layer in range(self.config.num_hidden_layers):
                cache.update(stub, stub, layer)
        # transformers applies the target's LM head to it: hand it back in the target's dtype (that of its embeddings)
        return BaseModelOutput(last_hidden_state=hidden.to(noise_embeds.dtype))


class _ForwardCounter:
    """Counts target forwards (for the acceptance length of loops that do not report it)."""

    def __init__(self, target: Any) -> None:
        self.count = 0
        self.handle = target.register_forward_pre_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.count += 1


def _timed_generate(target: Any, ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, float]:
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = target.generate(ids, **kwargs)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def two_row_forward_ms(target: Any, ids: torch.Tensor, repeats: int = 9) -> float | None:
    """Median ms of a 2-token target forward after the prompt ``ids``, under DFlash's few-row matmul routine.

    On CPU that routine makes a 2-row forward cheaper than a 1-row one (BLAS runs one row on one core), so a plain
    decode padded to two rows would pay about this per token. Dividing by it instead of the plain time separates
    what speculation buys from what the routine buys. None off CPU, where the routine is not used.
    """
    if ids.device.type != "cpu":
        return None
    cache_kwarg = forward_cache_kwarg(target)
    times = []
    with torch.no_grad(), routed_linears(target, ids.device):
        cache = cache_from_output(target(input_ids=ids, use_cache=True))
        for _ in range(repeats):
            start = time.perf_counter()
            with few_row_products(ids.device):
                target(input_ids=ids[:, -2:], use_cache=True, **{cache_kwarg: cache})
            times.append(time.perf_counter() - start)
            crop_cache(cache, 2)
    return 1000 * sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------------------
# The methods compared: each is one generate call on one prompt
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MethodRun:
    """One method's generate on one prompt: its output, wall time, and what its loop tells about verify steps."""

    output: torch.Tensor
    seconds: float
    new_tokens: int
    verify_steps: int = 0  # target forwards that verified drafts (the prefill excluded)
    verified_tokens: int = 0  # tokens those forwards committed
    acceptance_lengths: list[int] = field(default_factory=list)  # DFlash: per verify step
    draft_s: float = 0.0  # DFlash: drafting and verifying wall time over those steps
    verify_s: float = 0.0


def _method_run(ids: torch.Tensor, out: torch.Tensor, seconds: float, **steps: Any) -> MethodRun:
    return MethodRun(out, seconds, out.shape[1] - ids.shape[1], **steps)


def run_plain(target: Any, ids: torch.Tensor, **generate_kwargs: Any) -> MethodRun:
    """Plain greedy ``generate``: the reference every other method must reproduce."""
    return _method_run(ids, *_timed_generate(target, ids, **generate_kwargs))


def run_dflash(target: Any, drafter: Any, ids: torch.Tensor, **generate_kwargs: Any) -> MethodRun:
    """Our DFlash loop; its step statistics come from ``drafter.last_stats``."""
    out, seconds = _timed_generate(target, ids, assistant_model=drafter, **generate_kwargs)
    stats = drafter.last_stats
    return _method_run(ids, out, seconds, verify_steps=stats.num_verify_steps,
                       verified_tokens=sum(stats.acceptance_lengths), acceptance_lengths=list(stats.acceptance_lengths),
                       draft_s=stats.draft_time_s, verify_s=stats.verify_time_s)


def run_dflash_lookup(target: Any, drafter: Any, ids: torch.Tensor, **generate_kwargs: Any) -> MethodRun:
    """Our DFlash loop with prompt-lookup proposals: each step verifies the drafter's block or an n-gram copied
    from the sequence, whichever is expected to bring more (``lookup_dflash``)."""
    return run_dflash(target, drafter, ids, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS, **generate_kwargs)


def run_transformers_dflash(target: Any, adapter: TransformersDFlashAdapter, ids: torch.Tensor,
                            **generate_kwargs: Any) -> MethodRun:
    """transformers' own DFlash path driving our drafter; it reports no steps, so its target forwards are counted."""
    adapter.reset()
    counter = _ForwardCounter(target)
    try:
        out, seconds = _timed_generate(target, ids, assistant_model=adapter, speculation_type="dflash",
                                       **generate_kwargs)
    finally:
        counter.handle.remove()
    # The prefill commits one token; every later forward verifies a block.
    return _method_run(ids, out, seconds, verify_steps=counter.count - 1,
                       verified_tokens=out.shape[1] - ids.shape[1] - 1)


def run_prompt_lookup(target: Any, ids: torch.Tensor, **generate_kwargs: Any) -> MethodRun:
    """Prompt-lookup decoding: drafts are n-grams copied from the prompt, no drafter model."""
    out, seconds = _timed_generate(target, ids, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS, **generate_kwargs)
    return _method_run(ids, out, seconds)


def _method_runners(methods: tuple[str, ...], target: Any, drafter: Any) -> dict[str, Callable[..., MethodRun]]:
    """``(ids, **generate_kwargs) -> MethodRun`` for each of ``methods``, in their order."""
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown or "plain" not in methods:
        raise ValueError(f"methods {list(methods)}: each must be one of {', '.join(METHOD_LABELS)}, and 'plain' "
                         "(the reference the others are checked against) must be among them")
    runners = {
        "plain": functools.partial(run_plain, target),
        "dflash": functools.partial(run_dflash, target, drafter),
        "dflash_lookup": functools.partial(run_dflash_lookup, target, drafter),
        "prompt_lookup": functools.partial(run_prompt_lookup, target),
    }
    if "transformers_dflash" in methods:
        runners["transformers_dflash"] = functools.partial(run_transformers_dflash, target,
                                                           TransformersDFlashAdapter(drafter))
    return {m: runners[m] for m in methods}


# ----------------------------------------------------------------------------------------------------------------
# The bench: every method on every prompt, then the aggregation
# ----------------------------------------------------------------------------------------------------------------
def run_bench(
    target: Any,
    tokenizer: Any,
    drafter: Any,
    prompts: list[str],
    max_new_tokens: int = 128,
    methods: tuple[str, ...] | None = None,
    warmup: bool = True,
    batch_shape_control: bool = False,
) -> dict:
    """Time every method on every prompt (alternating order); returns the results dict (JSON-ready).

    Methods: plain greedy, our DFlash loop, the same with prompt-lookup proposals, transformers' own DFlash path
    driving the same drafter (when the installed transformers has one) and prompt-lookup decoding.
    ``batch_shape_control``: also run plain generate on each prompt as a batch of two copies and count the prompts
    whose output then differs from one-row plain decoding: how often the target's own numerics depend on the
    number of rows, the yardstick for the other methods' mismatches in reduced precision.
    """
    if methods is None:
        methods = ("plain", "dflash", "dflash_lookup", "transformers_dflash", "prompt_lookup") \
            if transformers_has_dflash() else ("plain", "dflash", "dflash_lookup", "prompt_lookup")
    runners = _method_runners(methods, target, drafter)
    device = next(target.parameters()).device
    base = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    encoded = [chat_input_ids(tokenizer, p, device) for p in prompts]
    if warmup:
        for run in runners.values():
            run(encoded[0], **{**base, "max_new_tokens": 8})
    runs = [_run_prompt(runners, ids, index, base)
            for index, ids in enumerate(tqdm(encoded, desc="bench", unit="prompt"))]
    results = {
        "command": " ".join(["dflash-hf", *sys.argv[1:]]) if Path(sys.argv[0]).name == "dflash-hf" else None,
        **_run_facts(target, drafter, max_new_tokens, len(prompts)),
        **aggregate_runs(prompts, runs, methods, drafter.config.block_size,
                         two_row_ms=lambda: two_row_forward_ms(target, encoded[0])),
    }
    if batch_shape_control:
        results["plain_batch_of_two_mismatched_prompts"] = [
            i for i, (ids, prompt_runs) in enumerate(zip(encoded, runs))
            if not torch.equal(target.generate(ids.repeat(2, 1), attention_mask=torch.ones_like(ids).repeat(2, 1),
                                               **base)[:1], prompt_runs["plain"].output)]
    return results


def _run_prompt(runners: dict[str, Callable[..., MethodRun]], ids: torch.Tensor, index: int,
                generate_kwargs: dict) -> dict[str, MethodRun]:
    """Every method on one prompt, in reverse order on every other prompt (drift then hits all methods alike)."""
    order = list(runners) if index % 2 == 0 else list(reversed(runners))
    return {method: runners[method](ids, **generate_kwargs) for method in order}


def aggregate_runs(prompts: list[str], runs: list[dict[str, MethodRun]], methods: tuple[str, ...], block_size: int,
                   two_row_ms: Callable[[], float | None] = lambda: None) -> dict:
    """What ``run_bench`` reports (the machine aside) from its runs: one ``{method: MethodRun}`` per prompt.

    ``two_row_ms`` measures the CPU control of the DFlash step cost; it is called only when there is one."""
    by_method = {m: [prompt_runs[m] for prompt_runs in runs] for m in methods}
    mismatches = {m: [i for i, (mine, plain) in enumerate(zip(by_method[m], by_method["plain"]))
                      if not torch.equal(mine.output, plain.output)]
                  for m in methods if m != "plain"}
    dflash = by_method.get("dflash", [])
    plain_rate = _tokens_per_s(by_method["plain"])
    return {
        "lossless": not any(mismatches.values()),
        "mismatched_prompts": mismatches,
        "methods": {m: _method_row(by_method[m], plain_rate) for m in methods},
        "acceptance_histogram": dict(sorted(Counter(n for run in dflash for n in run.acceptance_lengths).items())),
        "step_cost": _step_cost(by_method["plain"], dflash, two_row_ms),
        "block_size": block_size,
        "per_prompt": [_prompt_row(prompt, prompt_runs, index, mismatches)
                       for index, (prompt, prompt_runs) in enumerate(zip(prompts, runs))],
    }


def _tokens_per_s(runs: list[MethodRun]) -> float:
    return sum(r.new_tokens for r in runs) / sum(r.seconds for r in runs)


def _mean_acceptance_length(runs: list[MethodRun]) -> float | None:
    """Tokens committed per verifying forward; None for a method that verifies no drafts (or never did)."""
    steps = sum(r.verify_steps for r in runs)
    return sum(r.verified_tokens for r in runs) / steps if steps > 0 else None


def _method_row(runs: list[MethodRun], plain_rate: float) -> dict:
    rate = _tokens_per_s(runs)
    tau = _mean_acceptance_length(runs)
    return {"tokens_per_s": round(rate, 3), "speedup": round(rate / plain_rate, 3),
            "mean_acceptance_length": round(tau, 3) if tau is not None else None}


def _step_cost(plain: list[MethodRun], dflash: list[MethodRun], two_row_ms: Callable[[], float | None]) -> dict | None:
    """What one DFlash step costs next to one plain token: the acceptance length above which DFlash pays off, and
    on CPU the control against a decode that pays a 2-row forward per token."""
    steps = sum(r.verify_steps for r in dflash)
    if steps == 0:
        return None
    plain_ms = 1000 * sum(r.seconds for r in plain) / sum(r.new_tokens for r in plain)
    draft_ms, verify_ms = (1000 * sum(seconds) / steps for seconds in ([r.draft_s for r in dflash],
                                                                          [r.verify_s for r in dflash]))
    cost = {"plain_ms_per_token": round(plain_ms, 2), "draft_ms_per_step": round(draft_ms, 2),
            "verify_ms_per_step": round(verify_ms, 2),
            "break_even_acceptance_length": round((draft_ms + verify_ms) / plain_ms, 3)}
    control_ms = two_row_ms()
    if control_ms is not None:
        cost["two_row_forward_ms"] = round(control_ms, 2)
        cost["speedup_over_two_row_decode"] = round(
            _mean_acceptance_length(dflash) * control_ms / (draft_ms + verify_ms), 3)
    return cost


def _prompt_row(prompt: str, prompt_runs: dict[str, MethodRun], index: int, mismatches: dict[str, list[int]]) -> dict:
    row = {"prompt": prompt, "new_tokens": prompt_runs["plain"].new_tokens}
    row.update({f"{method}_lossless": index not in mismatched for method, mismatched in mismatches.items()})
    return row


def _run_facts(target: Any, drafter: Any, max_new_tokens: int, num_prompts: int) -> dict:
    """What a benchmark ran on: models, machine, precision, lengths and library versions."""
    from ..machine import cpu_facts

    return {
        "target": getattr(target.config, "name_or_path", "") or type(target).__name__,
        "drafter": getattr(drafter.config, "name_or_path", "") or "drafter",
        "device": str(next(target.parameters()).device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_info": cpu_facts(),  # model name, family, model, avx512_bf16 ...: what bf16 speed depends on
        "threads": torch.get_num_threads(),
        "dtype": dtype_name(next(target.parameters()).dtype),
        "drafter_dtype": dtype_name(drafter.fc.weight.dtype),
        "max_new_tokens": max_new_tokens,
        # "auto": chosen per step by cost (each run's choices are in its drafts_per_step list)
        "drafts_per_step": "auto" if getattr(drafter, "num_speculative_tokens", None) == "auto"
        else max_drafts_per_step(drafter),
        "num_prompts": num_prompts,
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
    }


def sampling_acceptance(
    target: Any, tokenizer: Any, drafter: Any, prompts: list[str], temperature: float = 1.0,
    max_new_tokens: int = 128, seed: int = 0,
) -> dict[str, float]:
    """Mean acceptance length of the strict and ratio sampling rules at ``temperature`` (same prompts, seeds)."""
    device = next(target.parameters()).device
    encoded = [chat_input_ids(tokenizer, p, device) for p in prompts]
    previous = drafter.sampling_mode
    out = {}
    try:
        for mode in ("strict", "ratio"):
            drafter.sampling_mode = mode
            lengths: list[int] = []
            for index, ids in enumerate(tqdm(encoded, desc=f"sampling ({mode})", unit="prompt")):
                torch.manual_seed(seed + index)
                target.generate(ids, assistant_model=drafter, do_sample=True, temperature=temperature, top_k=0,
                                top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
                lengths.extend(drafter.last_stats.acceptance_lengths)
            out[mode] = round(sum(lengths) / len(lengths), 3)
    finally:
        drafter.sampling_mode = previous
    return out


def run_batch_bench(
    target: Any,
    tokenizer: Any,
    drafter: Any,
    prompts: list[str],
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    max_new_tokens: int = 128,
) -> dict:
    """Plain batched ``generate`` vs batched DFlash at each batch size, alternating, on left-padded chunks of
    ``prompts``. Every DFlash batch is compared with the plain batch, row by row."""
    device = next(target.parameters()).device
    base = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"

    def left_padded(chunk: list[list[int]]) -> Any:
        return tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt").to(device)

    rows = []
    try:
        target.generate(**left_padded(encoded[:2]), **{**base, "max_new_tokens": 8}, assistant_model=drafter)  # warm-up
        for size in batch_sizes:
            totals = {"plain": [0, 0.0], "dflash": [0, 0.0]}
            acceptance: list[int] = []
            mismatched = 0
            chunks = [encoded[i : i + size] for i in range(0, len(encoded) - size + 1, size)]
            for index, chunk in enumerate(tqdm(chunks, desc=f"batch {size}", unit="batch")):
                batch = left_padded(chunk)
                order = ("plain", "dflash") if index % 2 == 0 else ("dflash", "plain")
                outputs = {}
                for method in order:
                    extra = {"assistant_model": drafter} if method == "dflash" else {}
                    out, seconds = _timed_generate(target, batch["input_ids"], attention_mask=batch["attention_mask"],
                                                   **base, **extra)
                    outputs[method] = out
                    totals[method][0] += _new_tokens(out, batch["input_ids"].shape[1], tokenizer.eos_token_id)
                    totals[method][1] += seconds
                    if method == "dflash":
                        acceptance.extend(drafter.last_stats.acceptance_lengths)
                mismatched += int((outputs["plain"] != outputs["dflash"]).any(dim=1).sum())
            plain_rate = totals["plain"][0] / totals["plain"][1]
            dflash_rate = totals["dflash"][0] / totals["dflash"][1]
            rows.append({
                "batch_size": size,
                "num_batches": len(chunks),
                "plain_tokens_per_s": round(plain_rate, 3),
                "dflash_tokens_per_s": round(dflash_rate, 3),
                "speedup": round(dflash_rate / plain_rate, 3),
                "mean_acceptance_length": round(sum(acceptance) / max(1, len(acceptance)), 3),
                "mismatched_rows": mismatched,
            })
    finally:
        tokenizer.padding_side = previous_side
    return {
        **_run_facts(target, drafter, max_new_tokens, len(prompts)),
        "lossless": all(row["mismatched_rows"] == 0 for row in rows),
        "batches": rows,
    }


def _new_tokens(out: torch.Tensor, prompt_width: int, eos: int | None) -> int:
    """Generated tokens of a batch, up to and including each row's EOS (the padding after it is not work)."""
    generated = out[:, prompt_width:]
    if eos is None:
        return generated.numel()
    is_eos = generated == eos
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, generated.shape[1])
    return int(first.sum())


def format_batch_table(results: dict) -> str:
    lines = [f"{'batch':>6}{'plain tok/s':>14}{'DFlash tok/s':>14}{'speedup':>10}{'accept len':>12}{'mismatches':>12}"]
    for row in results["batches"]:
        lines.append(f"{row['batch_size']:>6}{row['plain_tokens_per_s']:>14.2f}{row['dflash_tokens_per_s']:>14.2f}"
                     f"{row['speedup']:>9.2f}x{row['mean_acceptance_length']:>12.2f}{row['mismatched_rows']:>12}")
    lines.append(f"{results['num_prompts']} prompts, {results['max_new_tokens']} new tokens max, greedy, "
                 f"{results['device']} {results['dtype']}")
    return "\n".join(lines)


def plot_batch_results(results: dict, path: str | Path) -> None:
    """Throughput of plain vs DFlash against batch size, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["batch_size"] for row in results["batches"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [row["plain_tokens_per_s"] for row in results["batches"]], "o-", color="#999999", label="plain")
    ax.plot(sizes, [row["dflash_tokens_per_s"] for row in results["batches"]], "o-", color="#dd8452", label="DFlash")
    for row in results["batches"]:
        ax.annotate(f"{row['speedup']:.2f}x", (row["batch_size"], row["dflash_tokens_per_s"]), ha="center",
                    va="bottom")
    ax.set(xscale="log", xticks=sizes, xticklabels=[str(s) for s in sizes], xlabel="batch size",
           ylabel="new tokens / s", title=f"Batched generate ({results['device']}, {results['dtype']})")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


PLOT_EXTRA = "pip install 'dflash-hf[bench]'"  # the extra that brings matplotlib


def format_table(results: dict) -> str:
    width = max(len(label) for label in METHOD_LABELS.values()) + 2
    lines = [f"{'method':<{width}}{'tokens/s':>10}{'speedup':>10}{'accept len':>12}"]
    for method, row in results["methods"].items():
        tau = f"{row['mean_acceptance_length']:.2f}" if row["mean_acceptance_length"] is not None else "-"
        lines.append(f"{METHOD_LABELS.get(method, method):<{width}}{row['tokens_per_s']:>10.2f}{row['speedup']:>9.2f}x"
                     f"{tau:>12}")
    cost = results.get("step_cost")
    if cost:
        lines.append(f"DFlash step: draft {cost['draft_ms_per_step']:.1f} ms + verify {cost['verify_ms_per_step']:.1f} ms; "
                     f"plain: {cost['plain_ms_per_token']:.1f} ms/token (prefill included) -> DFlash pays off above "
                     f"acceptance length {cost['break_even_acceptance_length']:.2f}")
        if "two_row_forward_ms" in cost:
            lines.append(f"control: a 2-token target forward under DFlash's few-row matmul routine takes "
                         f"{cost['two_row_forward_ms']:.1f} ms; against a plain decode paying that per token, "
                         f"DFlash would be {cost['speedup_over_two_row_decode']:.2f}x (speculation alone)")
    verdict = "lossless on every prompt" if results["lossless"] else f"MISMATCH: {results['mismatched_prompts']}"
    lines.append(f"{results['num_prompts']} prompts, {results['max_new_tokens']} new tokens max, greedy; {verdict}")
    control = results.get("plain_batch_of_two_mismatched_prompts")
    if control is not None:
        lines.append(f"control: plain generate on each prompt as a batch of two differs from one-row plain on "
                     f"{len(control)} of {results['num_prompts']} prompts ({results['dtype']}: the target's own "
                     "numerics depend on the number of rows by that much)")
    return "\n".join(lines)


def format_dtype_comparison(by_dtype: dict[str, dict]) -> str:
    """One line per target dtype of a ``--dtype A B`` bench: each method's speedup over plain decoding in that
    dtype, and how many prompts each method (and plain as a batch of two) left identical to one-row plain."""
    methods = list(dict.fromkeys(m for results in by_dtype.values() for m in results["methods"] if m != "plain"))
    head = ["dtype", "plain tok/s", *(METHOD_LABELS.get(m, m) for m in methods), "accept len",
            "identical to plain", "plain batch of 2 identical"]
    rows = []
    for dtype, results in by_dtype.items():
        n = results["num_prompts"]
        tau = results["methods"].get("dflash", {}).get("mean_acceptance_length")
        same = ", ".join(f"{m} {n - len(results['mismatched_prompts'].get(m, []))}/{n}" for m in methods)
        control = results.get("plain_batch_of_two_mismatched_prompts")
        rows.append([dtype, f"{results['methods']['plain']['tokens_per_s']:.2f}",
                     *(f"{results['methods'][m]['speedup']:.2f}x" if m in results["methods"] else "-"
                       for m in methods),
                     f"{tau:.2f}" if tau is not None else "-", same,
                     f"{n - len(control)}/{n}" if control is not None else "-"])
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows])


def plot_results(results: dict, path: str | Path) -> None:
    """Acceptance-length histogram and throughput bars, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    hist = {int(k): v for k, v in results["acceptance_histogram"].items()}
    lengths = list(range(1, results["block_size"] + 1))
    left.bar(lengths, [hist.get(k, 0) for k in lengths], color="#4c72b0")
    tau = results["methods"]["dflash"]["mean_acceptance_length"]
    left.set(title=f"DFlash acceptance length per verify step (mean {tau:.2f})", xlabel="tokens committed per target forward", ylabel="steps")
    names = list(results["methods"])
    rates = [results["methods"][m]["tokens_per_s"] for m in names]
    palette = {"plain": "#999999", "dflash": "#dd8452", "dflash_lookup": "#8172b3",
               "transformers_dflash": "#c44e52", "prompt_lookup": "#55a868"}
    bars = right.bar([METHOD_LABELS.get(m, m) for m in names], rates, color=[palette.get(m, "#4c72b0") for m in names])
    plt.setp(right.get_xticklabels(), rotation=20, ha="right")
    for bar, m in zip(bars, names):
        right.annotate(f"{results['methods'][m]['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom")
    right.set(title=f"Throughput ({results['device']}, {results['dtype']})", ylabel="new tokens / s")
    fig.suptitle(f"{results['target']} + {results['drafter']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(results: dict, out_dir: str | Path) -> tuple[Path, Path | None]:
    """``bench.json`` and, when matplotlib is installed (see ``can_plot``), ``bench.png``; returns both paths, the
    PNG's None when it was skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "bench.json", out_dir / "bench.png"
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    if not can_plot():
        return json_path, None
    plot_results(results, png_path)
    return json_path, png_path


__all__ = [
    "METHOD_LABELS", "MethodRun", "PLOT_EXTRA", "TransformersDFlashAdapter", "aggregate_runs", "can_plot",
    "default_prompt_file", "format_batch_table", "format_table", "load_prompt_file", "plot_batch_results",
    "plot_results", "run_batch_bench", "run_bench", "run_dflash", "run_plain", "run_prompt_lookup",
    "run_transformers_dflash", "sampling_acceptance", "transformers_has_dflash", "write_outputs",
]
