"""``dflash-hf bench --suite NAME …``: plain vs DFlash on named prompt suites, one table per run.

Suites:

- ``bench-prompts``: the 24 hand-written held-out prompts shipped in ``dflash_hf/assets`` (the default bench);
- ``sharegpt-test``: the first human turn of a fixed, seeded sample of ShareGPT's test split (never trained on);
- ``humaneval``: the 164 HumanEval problems, each inside a fixed instruction (a benchmark only).

Each suite runs plain greedy ``generate`` and DFlash side by side (``bench.run_bench``); the table gives per suite
the prompts, mean acceptance length, speedup and how many prompts DFlash reproduced exactly. The suites and their
prompts (``SUITES``, ``suite_prompts``, ``bench_prompts``) live in ``prompt_sources``, below the tools, since
``dflash-hf adapt`` evaluates on them too; they are importable from here as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, can_plot, save_figure
from ..training.prompt_sources import SUITES, bench_prompts, suite_prompts

SUITE_METHODS = ("plain", "dflash")
SUITES_JSON = "bench_suites.json"
SUITES_PNG = "bench_suites.png"


def suite_row(name: str, results: dict) -> dict:
    """One table row from a ``run_bench`` result."""
    lossless = sum(bool(row.get("dflash_lossless")) for row in results["per_prompt"])
    dflash = results["methods"]["dflash"]
    return {
        "suite": name,
        "prompts": results["num_prompts"],
        "mean_acceptance_length": dflash["mean_acceptance_length"],
        "speedup": dflash["speedup"],
        "dflash_tokens_per_s": dflash["tokens_per_s"],
        "plain_tokens_per_s": results["methods"]["plain"]["tokens_per_s"],
        "lossless_prompts": lossless,
    }


def run_suites(target: Any, tokenizer: Any, drafter: Any, prompts_by_suite: dict[str, list[str]],
               max_new_tokens: int = 128) -> dict:
    """Run every suite (plain vs DFlash); the results carry the table, each suite's full bench and the machine."""
    from .bench import run_bench

    runs = {}
    for index, (name, prompts) in enumerate(prompts_by_suite.items()):
        runs[name] = run_bench(target, tokenizer, drafter, prompts, max_new_tokens=max_new_tokens,
                               methods=SUITE_METHODS, warmup=index == 0)
    first = next(iter(runs.values()))
    facts = {key: first[key] for key in ("target", "drafter", "device", "cpu", "cpu_info", "threads", "dtype",
                                         "drafter_dtype", "max_new_tokens", "drafts_per_step",
                                         "transformers_version", "torch_version")}
    return {
        **facts,
        "methods_compared": list(SUITE_METHODS),
        "suites": [suite_row(name, results) for name, results in runs.items()],
        "lossless": all(results["lossless"] for results in runs.values()),
        "runs": runs,
    }


def format_suite_table(results: dict) -> str:
    lines = [f"{'suite':<16}{'prompts':>8}{'accept len':>12}{'speedup':>10}{'lossless':>10}"]
    for row in results["suites"]:
        tau = row["mean_acceptance_length"]
        tau_text = f"{tau:.2f}" if tau is not None else "-"
        lines.append(f"{row['suite']:<16}{row['prompts']:>8}{tau_text:>12}{row['speedup']:>9.2f}x"
                     f"{row['lossless_prompts']:>5}/{row['prompts']:<4}")
    info = results["cpu_info"]
    lines.append(f"{results['max_new_tokens']} new tokens max, greedy, {results['device']} {results['dtype']} "
                 f"target / {results['drafter_dtype']} drafter, {results['threads']} threads; CPU "
                 f"{info['cpu_model']} (family {info['cpu_family']}, model {info['cpu_model_number']}, "
                 f"avx512_bf16 {'yes' if info['avx512_bf16'] else 'no'}); torch {results['torch_version']}, "
                 f"transformers {results['transformers_version']}")
    return "\n".join(lines)


def plot_suites(results: dict, path: str | Path) -> None:
    """Mean acceptance length and speedup per suite, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["suite"] for row in results["suites"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.bar(names, [row["mean_acceptance_length"] or 0 for row in results["suites"]], color="#4c72b0")
    left.set(title="mean acceptance length", ylabel="tokens per target forward")
    bars = right.bar(names, [row["speedup"] for row in results["suites"]], color="#dd8452")
    right.axhline(1.0, color="#999999", linewidth=1)
    for bar, row in zip(bars, results["suites"]):
        right.annotate(f"{row['lossless_prompts']}/{row['prompts']} lossless",
                       (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    right.set(title="speedup over plain generate", ylabel="x")
    fig.suptitle(f"{results['target']} + {results['drafter']} on {results['cpu_info']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write_suite_outputs(results: dict, out_dir: str | Path) -> tuple[Path, Path | None]:
    """``bench_suites.json`` and, with matplotlib, ``bench_suites.png``; the PNG's path is None when skipped."""
    out_dir = Path(out_dir)
    json_path = out_dir / SUITES_JSON
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    if not can_plot():
        return json_path, None
    plot_suites(results, out_dir / SUITES_PNG)
    return json_path, out_dir / SUITES_PNG


__all__ = ["SUITES", "bench_prompts", "format_suite_table", "plot_suites", "run_suites", "suite_prompts",
           "suite_row", "write_suite_outputs"]
