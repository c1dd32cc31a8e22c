"""How often greedy DFlash differs from plain greedy ``generate`` per dtype, and where the two first part.

A verify step runs the target over a block of tokens (4 on the default pair, 8 on the tiny model); plain decoding
runs it over one. In float32 and float64 the two agree token for token. In bfloat16 and float16 a block forward
rounds differently from single-token forwards (other matmul kernels, other summation orders), and at a near-tie
of the two best logits that flips the argmax; from there the two continuations part. This measures it:

- ``dflash``: DFlash (the default: CPU few-row routine on) against plain batch-1 ``generate``, same dtype.
- ``dflash_no_few_row``: the same with ``drafter.few_row_matmul_on_cpu = False`` (BLAS's own products). The routine
  only takes float32 products, so in bfloat16/float16 this is the same computation.
- ``dflash_fp32_head``: a prototype of an fp32-logits option, patched in here (the library is unchanged): the final
  norm output is upcast and the LM head runs in float32 (float32 weights) during the DFlash call only. Compared with plain
  ``generate`` (``_vs_plain``) and with plain ``generate`` under the same patch (``_vs_plain_fp32_head``).
- ``plain_batch2``: plain ``generate`` of the prompt in a left-padded batch of 2 with its neighbour, against batch 1.
  A reference point: plain decoding in reduced precision also depends on how the forward is shaped.
- ``plain_vs_float32``: plain ``generate`` in this dtype against plain ``generate`` in float32.

At each first divergence the script reads both runs' logits there: the reference's logit of its own token minus
that of the other run's token, and the other run's own gap the other way round (>= 0: it took the argmax of what
it computed; for DFlash, of the block forward's logits), in units of the dtype's spacing (ulp) at that logit.
Positions are 0-based generated positions. It also records the dtype ``output_logits`` come back in.

Models: (a) the offline default pair (SmolLM2-135M-Instruct + the shipped drafter, prompts from
``dflash_hf/assets/bench_prompts.jsonl`` under the chat template, like ``dflash-hf bench``) and (b) a tiny random
Qwen3 (hidden 64, 4 layers, vocab 512, LM head scaled x30 so logits are peaked like a trained model's) with an
untrained 1-layer drafter (block 8: nearly every draft is rejected, so nearly every token comes from a block
forward's first slot). Greedy throughout. One thread by default (timings are not the point).

    python benchmarks/reduced_precision.py [--models default tiny] [--num-prompts 24] [--max-new-tokens 64]
        [--dtypes float32 bfloat16 float16] [--tiny-dtypes float64 float32 bfloat16 float16] [--out DIR]

Writes DIR/reduced_precision.json and DIR/reduced_precision.png (default DIR: bench-results/reduced_precision).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import dflash_hf

COMPARISONS = {
    "dflash": "DFlash vs plain",
    "dflash_no_few_row": "DFlash, few-row off, vs plain",
    "dflash_fp32_head_vs_plain": "DFlash fp32 head vs plain",
    "dflash_fp32_head_vs_plain_fp32_head": "both fp32 head",
    "plain_batch2": "plain batch 2 vs batch 1",
    "plain_vs_float32": "plain vs float32 plain",
}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=None, pad_token_id=None,
            bos_token_id=None)


# ----------------------------------------------------------------------------------------------------------------
# Models and prompts
# ----------------------------------------------------------------------------------------------------------------
def load_default(dtype: torch.dtype, num_prompts: int):
    from dflash_hf.tools.bench import load_prompt_file
    from dflash_hf.training.data import chat_prompt_ids

    target, tokenizer, drafter = dflash_hf.load_default_pair(dtype=dtype)
    prompts = [chat_prompt_ids(tokenizer, p) for p in load_prompt_file(None, limit=num_prompts)]
    pad = tokenizer.eos_token_id
    return target, drafter, prompts, dict(pad_token_id=pad), pad


def load_tiny(dtype: torch.dtype, num_prompts: int):
    torch.manual_seed(0)
    target = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY)).float().eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(30.0)  # peaked logits, like a trained model's
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = None
    torch.manual_seed(1)
    drafter = dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=8).eval()
    target, drafter = target.to(dtype), drafter.to(dtype)  # the same weights in every dtype
    gen = torch.Generator().manual_seed(2)
    prompts = []
    for _ in range(num_prompts):
        length = int(torch.randint(8, 41, (1,), generator=gen))
        # Never the pad id 0: generate would mask a prompt's own 0s when called without an attention mask.
        prompts.append(torch.randint(1, TINY["vocab_size"], (length,), generator=gen).tolist())
    return target, drafter, prompts, dict(pad_token_id=0), 0


@contextlib.contextmanager
def fp32_head(target):
    """Prototype of an fp32-logits option: ``lm_head(norm_output.float())`` with float32 weights."""
    head = target.get_output_embeddings()
    if head.weight.dtype in (torch.float32, torch.float64):
        yield False  # nothing to upcast
        return
    weight = head.weight.detach().float()
    bias = None if head.bias is None else head.bias.detach().float()
    head.forward = lambda hidden: F.linear(hidden.float(), weight, bias)
    try:
        yield True
    finally:
        del head.forward  # back to the class's forward


# ----------------------------------------------------------------------------------------------------------------
# Runs and comparisons
# ----------------------------------------------------------------------------------------------------------------
def greedy(target, ids: list[int], max_new_tokens: int, common: dict, drafter=None):
    """(new tokens, per-step float32 logits [n, V], logits dtype as returned)."""
    inputs = torch.tensor([ids])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  **common)
    if drafter is not None:
        kwargs["assistant_model"] = drafter
    out = target.generate(inputs, **kwargs)
    logits = torch.cat([step.float() for step in out.logits], dim=0)
    return out.sequences[0, len(ids):].tolist(), logits, str(out.logits[0].dtype).replace("torch.", "")


def greedy_batch2(target, a: list[int], b: list[int], max_new_tokens: int, common: dict, pad: int):
    """Plain greedy of two prompts in one left-padded batch: the new tokens of each row."""
    width = max(len(a), len(b))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in (a, b)])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (a, b)])
    out = target.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **common)
    return [out[i, width:].tolist() for i in range(2)]


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    """First generated position where ``other`` differs from ``reference`` (None: the same tokens).

    ``other`` is compared over ``reference``'s length (a batch row runs on with padding after its EOS)."""
    for i, token in enumerate(reference):
        if i >= len(other) or other[i] != token:
            return i
    return None


def ulp(value: float, dtype: torch.dtype) -> float:
    """Spacing of ``dtype`` at ``value`` (normal range)."""
    info = torch.finfo(dtype)
    magnitude = max(abs(value), info.tiny)
    return info.eps * 2.0 ** torch.floor(torch.log2(torch.tensor(magnitude))).item()


def gap_in_ulps(logits: torch.Tensor, position: int, picked: int, other: int, dtype: torch.dtype) -> float | None:
    """logit[picked] - logit[other] at ``position`` of a run, in ulps of ``dtype`` (None if out of range)."""
    if position >= logits.shape[0] or other is None:
        return None
    row = logits[position]
    return round((row[picked] - row[other]).item() / ulp(row[picked].item(), dtype), 3)


def summarise(outcomes: list[dict | None]) -> dict:
    """outcomes: per prompt, None (the same tokens) or that prompt's first divergence."""
    diverged = [o for o in outcomes if o is not None]
    positions = [o["position"] for o in diverged]
    return {
        "num_prompts": len(outcomes),
        "num_differing": len(diverged),
        "share_differing": len(diverged) / max(1, len(outcomes)),
        "first_divergence_mean": statistics.mean(positions) if positions else None,
        "first_divergence_median": statistics.median(positions) if positions else None,
        # Per differing prompt, by position: the 0-based generated position of the first differing token;
        # reference_gap_ulps: the reference run's logit of its token minus that of the other run's token there;
        # own_gap_ulps: the other run's own logits, its token minus the reference's (>= 0: it took the argmax
        # of what it computed; for DFlash, of the block forward's logits). In ulps of the dtype under test.
        "divergences": sorted(diverged, key=lambda o: (o["position"], o["prompt"])),
    }


def measure(model: str, dtype_name: str, args, float32_plain: dict | None) -> dict:
    dtype = getattr(torch, dtype_name)
    loader = load_default if model == "default" else load_tiny
    num_prompts = args.num_prompts if model == "default" else args.tiny_prompts
    started = time.perf_counter()
    target, drafter, prompts, common, pad = loader(dtype, num_prompts)
    target.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, assistant_model=drafter, **common)
    outcomes = {name: [] for name in COMPARISONS}
    plain_outputs, plain_logits_all, acceptance, logits_dtypes = [], [], [], {}

    def record(name: str, prompt: int, reference: list[int], ref_logits: torch.Tensor | None, other: list[int],
               other_logits: torch.Tensor | None = None) -> None:
        d = first_divergence(reference, other)
        if d is None:
            outcomes[name].append(None)
            return
        theirs = other[d] if d < len(other) else None
        outcomes[name].append({
            "prompt": prompt,
            "position": d,
            "reference_gap_ulps": None if ref_logits is None else gap_in_ulps(ref_logits, d, reference[d], theirs, dtype),
            "own_gap_ulps": None if other_logits is None or theirs is None
            else gap_in_ulps(other_logits, d, theirs, reference[d], dtype),
        })

    for i, ids in enumerate(prompts):
        plain, plain_logits, logits_dtypes["plain"] = greedy(target, ids, args.max_new_tokens, common)
        plain_outputs.append(plain)
        if dtype_name == "float32":
            plain_logits_all.append(plain_logits)
        drafter.few_row_matmul_on_cpu = True
        fast, fast_logits, logits_dtypes["dflash"] = greedy(target, ids, args.max_new_tokens, common, drafter)
        acceptance.append(drafter.last_stats.mean_acceptance_length)
        record("dflash", i, plain, plain_logits, fast, fast_logits)
        drafter.few_row_matmul_on_cpu = False
        fast, fast_logits, _ = greedy(target, ids, args.max_new_tokens, common, drafter)
        drafter.few_row_matmul_on_cpu = True
        record("dflash_no_few_row", i, plain, plain_logits, fast, fast_logits)
        with fp32_head(target) as patched:
            if patched:
                fast32, fast32_logits, _ = greedy(target, ids, args.max_new_tokens, common, drafter)
                plain32, plain32_logits, _ = greedy(target, ids, args.max_new_tokens, common)
        if patched:
            # The patch took: the logits are no longer all representable in the model's dtype.
            assert not torch.equal(plain32_logits, plain32_logits.to(dtype).float()), "fp32 head patch inactive"
            record("dflash_fp32_head_vs_plain", i, plain, plain_logits, fast32, fast32_logits)
            record("dflash_fp32_head_vs_plain_fp32_head", i, plain32, plain32_logits, fast32, fast32_logits)
        if float32_plain is not None:
            record("plain_vs_float32", i, float32_plain["outputs"][i], float32_plain["logits"][i], plain)
        print(f"  [{model} {dtype_name}] prompt {i + 1}/{len(prompts)}: first divergence "
              f"{(outcomes['dflash'][-1] or {}).get('position')}, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if args.batch2:
        for i in range(0, len(prompts) - 1, 2):
            rows = greedy_batch2(target, prompts[i], prompts[i + 1], args.max_new_tokens, common, pad)
            for j, row in zip((i, i + 1), rows):
                record("plain_batch2", j, plain_outputs[j], None, row)
    result = {
        "model": model,
        "dtype": dtype_name,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "drafts_per_step": dflash_hf.core.pair_dflash.max_drafts_per_step(drafter),
        "dflash_mean_acceptance_length": statistics.mean(acceptance),
        "output_logits_dtype": logits_dtypes,
        "seconds": round(time.perf_counter() - started, 1),
        "comparisons": {name: summarise(outcomes[name]) for name in COMPARISONS if outcomes[name]},
    }
    if dtype_name == "float32":
        result["_plain"] = {"outputs": plain_outputs, "logits": plain_logits_all}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def cpu_lines() -> list[str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [platform.processor() or platform.machine()]
    keep = ("Model name:", "CPU family:", "Model:")
    return [" ".join(line.split()) for line in text.splitlines() if line.startswith(keep)]


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def format_table(results: list[dict]) -> str:
    lines = ["| model | dtype | comparison | prompts differing | first divergence mean / median | positions | "
             "reference's logit gap there (ulps) | compared run's own gap (ulps) |", "|---|---|---|---|---|---|---|---|"]
    for row in results:
        for name, c in row["comparisons"].items():
            mean = "–" if c["first_divergence_mean"] is None else (
                f"{c['first_divergence_mean']:.1f} / {c['first_divergence_median']:g}")
            gaps = ", ".join(_num(o["reference_gap_ulps"]) for o in c["divergences"]) or "–"
            own = ", ".join(_num(o["own_gap_ulps"]) for o in c["divergences"]) or "–"
            positions = ", ".join(str(o["position"]) for o in c["divergences"]) or "–"
            lines.append(f"| {row['model']} | {row['dtype']} | {COMPARISONS[name]} | {c['num_differing']}/"
                         f"{c['num_prompts']} | {mean} | {positions} | {gaps} | {own} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        names = [n for n in COMPARISONS if any(n in r["comparisons"] for r in rows)]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            xs = [i + k * width for i, r in enumerate(rows) if name in r["comparisons"]]
            ys = [r["comparisons"][name]["share_differing"] for r in rows if name in r["comparisons"]]
            ax.bar(xs, ys, width, label=COMPARISONS[name])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["dtype"] for r in rows])
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of prompts whose greedy output differs")
        ax.set_title(f"{model}: {rows[0]['num_prompts']} prompts x {rows[0]['max_new_tokens']} new tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["default", "tiny"], default=["default", "tiny"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                        choices=["float64", "float32", "bfloat16", "float16"], help="dtypes of the default pair")
    parser.add_argument("--tiny-dtypes", nargs="+", default=["float64", "float32", "bfloat16", "float16"],
                        choices=["float64", "float32", "bfloat16", "float16"])
    parser.add_argument("--num-prompts", type=int, default=8,
                        help="default-pair prompts, of the 24 (8: about 14 min for both models "
                             "on a 2-core EPYC, one thread; 24: about 37 min)")
    parser.add_argument("--tiny-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-batch2", dest="batch2", action="store_false", help="skip the plain batch-2 reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-results/reduced_precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    results = []
    for model in args.models:
        dtypes = args.dtypes if model == "default" else args.tiny_dtypes
        # float32 first: the other dtypes are also compared with its plain outputs.
        dtypes = sorted(dtypes, key=lambda d: d != "float32")
        float32_plain = None
        for dtype_name in dtypes:
            row = measure(model, dtype_name, args, float32_plain)
            plain = row.pop("_plain", None)
            if plain is not None:
                float32_plain = plain
            results.append(row)
    report = {
        "command": "python benchmarks/reduced_precision.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_lines(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    print(format_table(results))
    for row in results:
        print(f"{row['model']} {row['dtype']}: DFlash mean acceptance {row['dflash_mean_acceptance_length']:.2f} "
              f"({row['drafts_per_step']} drafts per step); output_logits dtype {row['output_logits_dtype']}; "
              f"{row['seconds']} s")
    print("CPU: " + "; ".join(report["cpu"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "reduced_precision.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(results, out / "reduced_precision.png")
        print(f"wrote {json_path} and {out / 'reduced_precision.png'}")
    except ImportError:
        print(f"wrote {json_path} (no matplotlib: no PNG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
