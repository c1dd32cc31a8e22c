"""Recipe ablation: train drafter variants on one prepared run folder and measure acceptance ONLINE, in the real
decode loop, on prompts of ShareGPT's validation split (never trained on, and not the test split the final bench
reports).

The run folder comes from ``dflash-hf train --out RUN ... --steps 0`` (data and features). Each variant trains
from the same start (``--init-from``, default: the shipped drafter) for the same steps, into
``RUN/ablations/NAME`` (resumable: rerun the same command), then decodes the validation prompts greedily with
plain ``generate`` beside it to check every output is unchanged. Rows accumulate in ``RUN/ablations/table.json``
and ``table.png``.

    python benchmarks/recipe_ablation.py --run /work/runs/sg --variant ce --steps 500
    python benchmarks/recipe_ablation.py --run /work/runs/sg --variant distill --steps 500
    python benchmarks/recipe_ablation.py --run /work/runs/sg --variant vocab8k --steps 500
    python benchmarks/recipe_ablation.py --run /work/runs/sg --variant anchors64 --steps 500
    python benchmarks/recipe_ablation.py --run /work/runs/sg --table      # print the table so far

A grown run folder (more conversations) keeps the earlier rows: ``--name`` gives a new row its own name (and its
own folder), e.g. ``--variant vocab8k --name vocab8k-2000`` after growing the data to 2000 conversations.

Variants (each one switch away from ``ce``, today's objective): ``base`` (the start drafter, untrained here),
``ce``, ``distill`` (half cross-entropy, half the target's top-16 distribution; extracts the teacher files once),
``vocab8k`` (reduced draft vocabulary of the 8192 response tokens the target writes most), ``anchors64``
(64 blocks per sequence instead of 16), ``block16`` (16-token blocks, 15 drafts, the loss decay γ=7).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dflash_hf import DFlashDraftModel
from dflash_hf.fileio import atomic_write_text
from dflash_hf.machine import cpu_facts
from dflash_hf.tools.bench import can_plot
from dflash_hf.training.data import chat_prompt_ids, load_records, response_spans
from dflash_hf.training.default_pair import default_drafter_dir, load_default_target
from dflash_hf.training.pipeline import target_eos_ids
from dflash_hf.training.prompt_sources import bench_sample
from dflash_hf.training.trainer import (
    TEACHER_TOPK,
    FeatureDataset,
    TrainConfig,
    draft_vocabulary,
    extract_features,
    train_drafter,
    vocabulary_coverage,
)

VARIANTS = {
    "base": {},
    "ce": {},
    "distill": {"distill": 0.5},
    "vocab8k": {"draft_vocab_size": 8192},
    "vocab8k_distill": {"draft_vocab_size": 8192, "distill": 0.5},
    "anchors64": {"num_anchors": 64},
    "block16": {"block_size": 16},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder with data/ and features/")
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--name", default=None, help="row name and folder under RUN/ablations (default: the variant)")
    parser.add_argument("--table", action="store_true", help="print (and plot) the table so far")
    parser.add_argument("--init-from", default=None, help="start drafter (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num-prompts", type=int, default=16, help="validation prompts decoded")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    return parser.parse_args()


def build_drafter(args: argparse.Namespace, target, records: list[dict], switches: dict) -> DFlashDraftModel:
    drafter = DFlashDraftModel.from_pretrained(args.init_from or str(default_drafter_dir()), dtype=torch.float32)
    # Verify every draft: the shipped drafter caps itself at 3 per step, which would cap τ at 4 here.
    drafter.config.__dict__.pop("num_speculative_tokens", None)
    drafter.num_speculative_tokens = None
    if "block_size" in switches:  # the weights do not depend on the block size: only the masks and positions do
        drafter.config.block_size = switches["block_size"]
    if "draft_vocab_size" in switches:
        drafter.config.draft_vocab = draft_vocabulary(records, switches["draft_vocab_size"], target_eos_ids(target))
    return drafter


def validation_acceptance(target, tokenizer, drafter, prompts: list[str], max_new_tokens: int) -> dict:
    lengths, lossless = [], 0
    for prompt in prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
        common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        plain = target.generate(ids, **common)
        out = target.generate(ids, assistant_model=drafter, **common)
        lossless += bool(torch.equal(plain, out))
        lengths.extend(drafter.last_stats.acceptance_lengths)
    return {"mean_acceptance_length": round(sum(lengths) / len(lengths), 3), "lossless": f"{lossless}/{len(prompts)}"}


def run_variant(args: argparse.Namespace) -> dict:
    switches = VARIANTS[args.variant]
    target, tokenizer = load_default_target()
    records = load_records(args.run / "data")
    drafter = build_drafter(args, target, records, switches)
    name = args.name or args.variant
    out = args.run / "ablations" / name
    started = time.perf_counter()
    if args.variant != "base":
        if switches.get("distill"):  # the target's distribution beside the features, once (resumable)
            extract_features(target, args.run / "data", args.run / "features", drafter.config.target_layer_ids,
                             teacher_top_k=TEACHER_TOPK)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=100,
                             mixed_precision="bf16", num_anchors=switches.get("num_anchors", 16),
                             distill=switches.get("distill", 0.0))
        train_drafter(drafter, target, FeatureDataset(args.run / "features"), out / "checkpoints", config)
        drafter.save_pretrained(out / "drafter")
    train_minutes = (time.perf_counter() - started) / 60
    prompts = bench_sample("sharegpt", size=args.num_prompts, split="validation")
    command = f"python benchmarks/recipe_ablation.py --run {args.run} --variant {args.variant} "
    command += (f"--name {name} " if args.name else "") + (f"--init-from {args.init_from} " if args.init_from else "")
    row = {
        "variant": name,
        "switches": switches,
        "start": args.init_from or "the shipped drafter",
        "command": command + f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr}",
        "steps": 0 if args.variant == "base" else args.steps,
        "sequences_per_step": args.batch_size,
        "train_minutes": round(train_minutes, 1),
        "data": f"{len(records)} ShareGPT conversations, "
                f"{sum(e - s for r in records for s, e in response_spans(r))} response tokens",
        **validation_acceptance(target, tokenizer, drafter.eval(), prompts, args.max_new_tokens),
        "validation_prompts": len(prompts),
        "cpu": {key: cpu_facts()[key] for key in ("cpu_model", "cpu_family", "cpu_model_number", "avx512_bf16")},
    }
    if drafter.config.draft_vocab is not None:
        row["draft_vocab_coverage"] = round(vocabulary_coverage(records, drafter.config.draft_vocab), 4)
    return row


def save_row(run: Path, row: dict) -> list[dict]:
    path = run / "ablations" / "table.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r["variant"] != row["variant"]] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rows, indent=2) + "\n")
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<18}{'steps':>6}{'train min':>10}{'τ (validation)':>16}{'lossless':>10}  data")
    for r in rows:
        print(f"{r['variant']:<18}{r['steps']:>6}{r['train_minutes']:>10}{r['mean_acceptance_length']:>16}"
              f"{r['lossless']:>10}  {r['data']}")


def plot_table(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["variant"] for r in rows], [r["mean_acceptance_length"] for r in rows], color="#4c72b0")
    ax.set_ylabel("mean acceptance length")
    ax.set_title("Recipe ablation: ShareGPT validation prompts, online")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if args.variant:
        rows = save_row(args.run, run_variant(args))
    else:
        path = args.run / "ablations" / "table.json"
        rows = json.loads(path.read_text()) if path.exists() else []
    print_table(rows)
    if rows and can_plot():
        plot_table(rows, args.run / "ablations" / "table.png")
    facts = cpu_facts()
    print(f"CPU: {facts['cpu_model']} (family {facts['cpu_family']}, model {facts['cpu_model_number']}, "
          f"avx512_bf16: {facts['avx512_bf16']})")


if __name__ == "__main__":
    main()
