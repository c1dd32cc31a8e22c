"""The drafter in float32 against bfloat16, side by side, on the default pair: acceptance, draft and verify cost.

Plain ``generate`` and DFlash with each drafter dtype run on the same prompts, interleaved prompt by prompt (the
order reversed on every other prompt), greedy, float32 target. Prints, per drafter dtype, the mean acceptance
length, the speedup over plain, one step's draft and verify milliseconds, the draft as a share of one plain token,
(draft + verify) / plain and the lossless count; then what ``fastest_drafter_dtype`` (the CLI's
``--drafter-dtype auto``) measured and chose on this machine. Writes ``draft_dtype.json`` and ``draft_dtype.png``.

    python benchmarks/draft_dtype.py [--num-prompts 12] [--max-new-tokens 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from tqdm import tqdm

from dflash_hf.fileio import atomic_file, atomic_write_text
from dflash_hf.machine import cpu_facts, describe_cpu
from dflash_hf.tools.bench import aggregate_runs, can_plot, load_prompt_file, run_dflash, run_plain
from dflash_hf.tools.draft_precision import fastest_drafter_dtype
from dflash_hf.training.data import chat_prompt_ids
from dflash_hf.training.default_pair import load_default_pair

DTYPES = (torch.float32, torch.bfloat16)


def name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def summarise(prompts: list[str], plain: list, runs: list, block_size: int) -> dict:
    """The bench's own aggregation of plain against one drafter's DFlash runs, flattened to one row."""
    pairs = [{"plain": p, "dflash": r} for p, r in zip(plain, runs)]
    result = aggregate_runs(prompts, pairs, ("plain", "dflash"), block_size)
    cost = result["step_cost"]
    return {
        **{k: result["methods"]["dflash"][k] for k in ("mean_acceptance_length", "speedup")},
        **cost,
        "draft_share_of_plain_token": round(cost["draft_ms_per_step"] / cost["plain_ms_per_token"], 4),
        "lossless": len(prompts) - len(result["mismatched_prompts"]["dflash"]),
        "steps": sum(r.verify_steps for r in runs),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["drafters"])
    rows = [results["drafters"][label] for label in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    draft = [r["draft_ms_per_step"] for r in rows]
    verify = [r["verify_ms_per_step"] for r in rows]
    ax.bar(labels, draft, label="draft", color="#dd8452")
    ax.bar(labels, verify, bottom=draft, label="verify", color="#4c72b0")
    ax.axhline(rows[0]["plain_ms_per_token"], color="#999999", linestyle="--", label="one plain token")
    for i, r in enumerate(rows):
        ax.annotate(f"draft {100 * r['draft_share_of_plain_token']:.1f} % of a plain token\n"
                    f"tau {r['mean_acceptance_length']:.2f}, {r['speedup']:.2f}x",
                    (i, r["draft_ms_per_step"] + r["verify_ms_per_step"]), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="ms per DFlash step", title=f"Drafter dtype ({results['cpu_info']['cpu_model']}, float32 target)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="draft_dtype_out")
    args = parser.parse_args()
    target, tokenizer, drafter = load_default_pair()
    drafters = {name(dtype): drafter if dtype == torch.float32 else copy.deepcopy(drafter).to(dtype)
                for dtype in DTYPES}
    chosen, timings = fastest_drafter_dtype(target, drafter)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    prompts = load_prompt_file(None, args.num_prompts)
    encoded = [torch.tensor([chat_prompt_ids(tokenizer, p)]) for p in prompts]
    methods = {"plain": lambda ids, **kw: run_plain(target, ids, **kw)}
    methods.update({label: (lambda ids, d=d, **kw: run_dflash(target, d, ids, **kw)) for label, d in drafters.items()})
    for run in methods.values():  # warm-up: caches, the few-row plan, the draft heads
        run(encoded[0], **{**common, "max_new_tokens": 8})
    runs: dict[str, list] = {label: [] for label in methods}
    for index, ids in enumerate(tqdm(encoded, desc="draft dtype", unit="prompt")):
        order = list(methods) if index % 2 == 0 else list(reversed(methods))
        for label in order:
            runs[label].append(methods[label](ids, **common))
    cpu = cpu_facts()
    results = {
        "command": "python benchmarks/draft_dtype.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "cpu_info": cpu, "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__, "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "drafts_per_step": drafter.num_speculative_tokens,
        "drafters": {label: summarise(prompts, runs["plain"], runs[label], drafter.config.block_size)
                     for label in drafters},
        "auto_choice": {"dtype": name(chosen), "ms_per_draft": {name(d): round(1e3 * s, 2) for d, s in timings.items()}},
    }
    print(f"CPU: {describe_cpu(cpu)}; {results['threads']} threads; {len(prompts)} prompts, {args.max_new_tokens} new "
          f"tokens, greedy, float32 target")
    print(f"{'drafter':<10}{'accept':>8}{'speedup':>9}{'draft ms':>10}{'verify ms':>11}{'plain ms':>10}"
          f"{'draft/plain':>13}{'step/plain':>12}{'lossless':>10}")
    for label, r in results["drafters"].items():
        print(f"{label:<10}{r['mean_acceptance_length']:>8.2f}{r['speedup']:>8.2f}x{r['draft_ms_per_step']:>10.2f}"
              f"{r['verify_ms_per_step']:>11.2f}{r['plain_ms_per_token']:>10.2f}"
              f"{100 * r['draft_share_of_plain_token']:>12.1f}%{r['break_even_acceptance_length']:>12.3f}"
              f"{r['lossless']:>7}/{len(prompts)}")
    measured = ", ".join(f"{k} {v:.2f} ms" for k, v in results["auto_choice"]["ms_per_draft"].items())
    print(f"--drafter-dtype auto on this machine: {results['auto_choice']['dtype']} (one synthetic draft: {measured})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "draft_dtype.json", json.dumps(results, indent=2) + "\n")
    if can_plot():
        plot(results, out / "draft_dtype.png")
    print(f"wrote {out / 'draft_dtype.json'}" + (f" and {out / 'draft_dtype.png'}" if can_plot() else ""))


if __name__ == "__main__":
    main()
