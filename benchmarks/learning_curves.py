"""Recipe rows at equal compute, as learning curves (the drafter campaign, issue 30 item 4).

Each row trains a NEW drafter from the same start (target layers copied in, ``init_from_target``) on the same
committed campaign data for the same wall minutes on this CPU, and is measured at evenly spaced points along the
way on conversations no row trains on (the last ``--heldout-shards`` ShareGPT shards, and the last chit-chat
shard where the campaign holds two or more): the decode-weighted
teacher-forced acceptance, the proxy the README shows agrees with online acceptance (1.373 against 1.417), since an
online measurement at every point would cost more than the training. Each curve is then fitted as the power law
``τ - 1 = c · minutes^α`` and extrapolated to the minutes it would need on this CPU to reach acceptance 2.5.

    python benchmarks/learning_curves.py --work-dir runs/curves --minutes 15 --points 4 \\
        --rows layers2 layers5 block16 anchors256 distill50 chitchat
    python benchmarks/learning_curves.py --work-dir runs/curves --table   # the table and PNG of what ran

Resumable: features, each row's plan (its step count, fixed by a probe the first time) and checkpoints stay in
``--work-dir``, and a rerun continues each row where it stopped. Writes ``curves.json`` and ``curves.png`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dflash_hf import DFlashDraftModel
from dflash_hf.fileio import atomic_write_text, can_plot, save_figure
from dflash_hf.machine import describe_cpu, dtype_name
from dflash_hf.training.campaign import (
    campaign_best_dir,
    campaign_features,
    campaign_shards,
    has_native_bfloat16,
    read_campaign_shard,
)
from dflash_hf.training.default_pair import default_drafter_dir, load_default_target
from dflash_hf.training.trainer import (
    TEACHER_TOPK,
    FeatureDataset,
    TrainConfig,
    teacher_forced_acceptance,
    train_drafter,
)

# Every row: 4 sequences per step, lr 6e-4 with warm-up and cosine decay over the row's steps, target layers
# copied in; each differs from ``layers2`` in one setting.
RECIPES = {
    "layers2": {"layers": 2, "block_size": 8, "num_anchors": 64},
    "layers5": {"layers": 5, "block_size": 8, "num_anchors": 64},
    "block16": {"layers": 2, "block_size": 16, "num_anchors": 64},
    "anchors256": {"layers": 2, "block_size": 8, "num_anchors": 256},
    # half cross-entropy on the target's greedy token, half on its top-16 distribution (taken with the features)
    "distill50": {"layers": 2, "block_size": 8, "num_anchors": 64, "distill": 0.5},
    # the data source: ShareGPT's training shards plus every chit-chat shard (`dflash-hf campaign --source chitchat`)
    "chitchat": {"layers": 2, "block_size": 8, "num_anchors": 64, "data": "sharegpt+chitchat"},
}
GOAL = 2.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/curves"))
    parser.add_argument("--campaign-dir", type=Path, default=Path("campaign"))
    parser.add_argument("--rows", nargs="+", choices=sorted(RECIPES), default=["layers2", "layers5"])
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall minutes per row (default: 15)")
    parser.add_argument("--points", type=int, default=4, help="measurements along each row (default: 4)")
    parser.add_argument("--heldout-shards", type=int, default=1, help="last campaign shards kept out (default: 1)")
    parser.add_argument("--eval-examples", type=int, default=48, help="held-out conversations measured (default: 48)")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--table", action="store_true", help="only print the table and draw the PNG")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    path = args.work_dir / "curves.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if not args.table:
        run_rows(args, results, path)
    print_table(results)
    if plot_curves(results, args.work_dir / "curves.png"):
        print(f"plot: {args.work_dir / 'curves.png'}")


def run_rows(args: argparse.Namespace, results: dict, path: Path) -> None:
    target, _ = load_default_target(torch.float32)
    shipped = DFlashDraftModel.from_pretrained(default_drafter_dir(), dtype=torch.float32).eval()
    shards = campaign_shards(args.campaign_dir / "data")
    split = split_shards([read_campaign_shard(shard)[1].get("source", "sharegpt") for shard in shards],
                         args.heldout_shards)
    native_bf16 = has_native_bfloat16()
    teacher_top_k = TEACHER_TOPK if any(RECIPES[name].get("distill", 0) > 0 for name in args.rows) else 0
    folder, _, speeds = campaign_features(target, shards, args.work_dir, shipped.config.target_layer_ids, native_bf16,
                                          teacher_top_k=teacher_top_k)
    train_sets = {data: FeatureDataset(folder, shards=numbers) for data, numbers in split["train"].items()
                  if any(RECIPES[name].get("data", "sharegpt") == data for name in args.rows)}
    heldout = {source: first_examples(FeatureDataset(folder, shards=numbers), args.eval_examples)
               for source, numbers in split["heldout"].items()}
    results.update(cpu=describe_cpu(), train_shards=shard_ranges(split["train"]["sharegpt"]),
                   train_examples={data: len(dataset) for data, dataset in train_sets.items()},
                   heldout_shards=shard_ranges(split["heldout"]["sharegpt"]),
                   heldout_examples=len(heldout["sharegpt"]),
                   forward_tokens_per_s={dtype_name(d): round(s) for d, s in speeds.items()})
    if "chitchat" in heldout:
        results.update(chitchat_heldout_shards=shard_ranges(split["heldout"]["chitchat"]),
                       chitchat_heldout_examples=len(heldout["chitchat"]))
    references = {"shipped drafter": default_drafter_dir(), "campaign drafter": campaign_best_dir(args.campaign_dir)}
    for name, drafter_dir in references.items():
        if drafter_dir is not None:
            measured = results.setdefault("references", {}).setdefault(name, {})
            drafter = None
            for source, examples in heldout.items():
                key = "" if source == "sharegpt" else f"{source}_"
                if f"{key}decode_weighted_accept_len" not in measured:
                    if drafter is None:
                        drafter = DFlashDraftModel.from_pretrained(drafter_dir, dtype=torch.float32).eval()
                    measured.update(proxy(drafter, target, examples, prefix=key))
            print(f"{name}: {measured}")

    def save() -> None:
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")

    save()
    mixed = "bf16" if native_bf16 else "no"
    for name in args.rows:
        recipe = RECIPES[name]
        if recipe.get("data", "sharegpt") not in train_sets:
            raise SystemExit(f"row {name} trains on {recipe['data']}, but {args.campaign_dir}/data holds no "
                             f"{recipe['data'].split('+')[-1]} shard; run `dflash-hf campaign --source "
                             f"{recipe['data'].split('+')[-1]} --regenerate N` first.")
        row = results["rows"].setdefault(name, {"recipe": {**recipe, "lr": args.lr, "batch_size": 4,
                                                           "init_from_target": True, "mixed_precision": mixed},
                                                "points": []})
        run_row(name, row, shipped, target, train_sets[recipe.get("data", "sharegpt")], heldout, args, save)


def split_shards(sources: list[str], heldout_shards: int) -> dict:
    """Which campaign shards (by number) each kind of row trains on and which are measured, from each shard's
    source: ``{"train": {"sharegpt": [...], "sharegpt+chitchat": [...]}, "heldout": {"sharegpt": [...],
    "chitchat": [...]}}``. The last ``heldout_shards`` ShareGPT shards are held out, so a chit-chat slice committed
    after them leaves the held-out set (and its anchors, drawn by shard number) as it was; the last chit-chat shard
    is held out too where there are two or more. Rows on ShareGPT alone never see a chit-chat shard."""
    if heldout_shards < 1:
        raise SystemExit(f"--heldout-shards must be at least 1 (the rows are measured on it), got {heldout_shards}.")
    by_source: dict[str, list[int]] = {}
    for number, source in enumerate(sources):
        by_source.setdefault(source, []).append(number)
    sharegpt = by_source.get("sharegpt", [])
    if len(sharegpt) <= heldout_shards:
        raise SystemExit(f"the campaign holds {len(sharegpt)} ShareGPT shards; need more than --heldout-shards "
                         f"{heldout_shards}. Run `dflash-hf campaign --regenerate N` first.")
    train = {"sharegpt": sharegpt[:-heldout_shards]}
    heldout = {"sharegpt": sharegpt[-heldout_shards:]}
    chitchat = by_source.get("chitchat", [])
    if chitchat:
        if len(chitchat) >= 2:
            chitchat, heldout["chitchat"] = chitchat[:-1], chitchat[-1:]
        train["sharegpt+chitchat"] = sorted(train["sharegpt"] + chitchat)
    return {"train": train, "heldout": heldout}


def shard_ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def run_row(name: str, row: dict, shipped: DFlashDraftModel, target: Any, train_set: FeatureDataset,
            heldout: dict[str, FeatureDataset], args: argparse.Namespace, save: Callable[[], None]) -> None:
    recipe = row["recipe"]
    config = TrainConfig(steps=1, batch_size=recipe["batch_size"], num_anchors=recipe["num_anchors"],
                         lr=recipe["lr"], mixed_precision=recipe["mixed_precision"], save_every=10**9,
                         distill=recipe.get("distill", 0.0))
    row_dir = args.work_dir / "rows" / name
    if "steps" not in row:  # the plan, fixed once: as many steps as the probe says fit in the row's minutes
        probe = dataclasses.replace(config, steps=3)
        started = time.perf_counter()
        train_drafter(new_drafter(recipe, shipped, target), target, train_set, row_dir / "probe", probe, resume=False)
        row["probe_step_s"] = round((time.perf_counter() - started) / probe.steps, 3)
        row["steps"] = max(args.points, int(args.minutes * 60 / row["probe_step_s"]))
        row["minutes_planned"] = args.minutes
        save()
    steps, blocks_per_step = row["steps"], recipe["batch_size"] * recipe["num_anchors"]
    ends = [round(steps * (k + 1) / args.points) for k in range(args.points)]
    config = dataclasses.replace(config, steps=steps, save_every=steps)
    for end in ends[len(row["points"]):]:
        drafter = new_drafter(recipe, shipped, target)
        started = time.perf_counter()
        train_drafter(drafter, target, train_set, row_dir / "checkpoints", config, resume=True, stop_after=end)
        done = row["points"][-1]["train_minutes"] if row["points"] else 0.0
        point = {"steps": end, "train_minutes": round(done + (time.perf_counter() - started) / 60, 2),
                 "supervised_tokens": end * blocks_per_step * (recipe["block_size"] - 1),
                 **measure(drafter, target, heldout)}
        row["points"].append(point)
        save()
        print(f"{name}: step {end}/{steps}, {point['train_minutes']:.1f} min: decode-weighted τ "
              f"{point['decode_weighted_accept_len']:.3f} (position mean {point['accept_len']:.3f})", flush=True)


def new_drafter(recipe: dict, shipped: DFlashDraftModel, target: Any) -> DFlashDraftModel:
    """A drafter of the row's shape with the shipped one's taps, mask token and draft vocabulary, target layers
    copied in; its initial weights are drawn from a fixed seed, the same for every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DFlashDraftModel.from_target(
            target, num_hidden_layers=recipe["layers"], block_size=recipe["block_size"],
            target_layer_ids=shipped.config.target_layer_ids, mask_token_id=shipped.config.mask_token_id,
            init_from_target=True, draft_vocab=shipped.config.draft_vocab)


def first_examples(dataset: FeatureDataset, count: int) -> FeatureDataset:
    for field in ("examples", "spans", "teachers", "sources"):
        setattr(dataset, field, getattr(dataset, field)[:count])
    return dataset


def proxy(drafter: DFlashDraftModel, target: Any, heldout: FeatureDataset, prefix: str = "") -> dict:
    with torch.no_grad():
        result = teacher_forced_acceptance(drafter, target, heldout, num_anchors=64)
    return {prefix + key: round(result[key], 4) for key in ("decode_weighted_accept_len", "accept_len", "acc_slot1")}


def measure(drafter: DFlashDraftModel, target: Any, heldout: dict[str, FeatureDataset]) -> dict:
    """The proxy on every held-out set: ShareGPT's keys bare, the others' prefixed by their source."""
    return {key: value for source, examples in heldout.items()
            for key, value in proxy(drafter, target, examples, "" if source == "sharegpt" else f"{source}_").items()}


def extrapolate(points: list[dict]) -> dict:
    """Least-squares power law ``τ - 1 = c · minutes^α`` over the points (τ never falls below 1, and each doubling
    of compute gains less), and the minutes at which it reaches GOAL. Saturation is not modelled: where a curve
    bends over, reaching GOAL takes longer than this says, so it is an optimistic estimate."""
    usable = [p for p in points if p["decode_weighted_accept_len"] > 1.0 and p["train_minutes"] > 0]
    if len(usable) < 2:
        return {"exponent": None, "minutes_to_goal": None}
    xs = [math.log(p["train_minutes"]) for p in usable]
    ys = [math.log(p["decode_weighted_accept_len"] - 1.0) for p in usable]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0:
        return {"exponent": None, "minutes_to_goal": None}
    alpha = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread
    exponent = mx + (math.log(GOAL - 1.0) - my) / alpha if alpha > 1e-6 else math.inf
    minutes = math.exp(exponent) if exponent < 700 else None  # flat, falling, or past e^700 minutes: never
    return {"exponent": round(alpha, 4), "minutes_to_goal": minutes}


def print_table(results: dict) -> None:
    print(f"\nheld out: shards {results.get('heldout_shards')}, {results.get('heldout_examples')} conversations; "
          f"CPU: {results.get('cpu')}")
    chitchat = "chitchat_heldout_shards" in results
    if chitchat:
        print(f"chit-chat held out: shards {results['chitchat_heldout_shards']}, "
              f"{results['chitchat_heldout_examples']} conversations")
    for name, ref in results.get("references", {}).items():
        print(f"  {name}: decode-weighted τ {ref['decode_weighted_accept_len']:.3f}"
              + (f" (chit-chat {ref['chitchat_decode_weighted_accept_len']:.3f})"
                 if "chitchat_decode_weighted_accept_len" in ref else ""))
    extra_head, extra_rule = (" chit-chat τ, last point |", "---|") if chitchat else ("", "")
    print("| row | recipe | steps | train min | decode-weighted τ at each point | α in τ - 1 ∝ minutes^α | "
          f"minutes to τ {GOAL} on this CPU (extrapolated) |{extra_head}")
    print("|---|---|---|---|---|---|---|" + extra_rule)
    for name, row in results["rows"].items():
        r, points = row["recipe"], row["points"]
        fit = extrapolate(points)
        to_goal = fit["minutes_to_goal"]
        if len(points) < 2:
            shown = "too few points yet"
        else:
            shown = "never (flat)" if to_goal is None else f"{to_goal:,.0f} ({to_goal / 60:,.0f} h)"
        notes = (f", distill {r['distill']}" if r.get("distill") else "") + (f", {r['data']}" if r.get("data") else "")
        extra = ""
        if chitchat:
            last = points[-1].get("chitchat_decode_weighted_accept_len") if points else None
            extra = f" {last:.3f} |" if last is not None else " not measured |"
        print(f"| {name} | {r['layers']} layers, block {r['block_size']}, {r['num_anchors']} anchors{notes} | "
              f"{points[-1]['steps'] if points else 0}/{row.get('steps', '?')} | "
              f"{points[-1]['train_minutes'] if points else 0:.1f} | "
              + " → ".join(f"{p['decode_weighted_accept_len']:.3f}" for p in points)
              + f" | {fit['exponent']} | {shown} |{extra}")


def plot_curves(results: dict, path: Path) -> bool:
    if not results["rows"] or not can_plot():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in results["rows"].items():
        points = row["points"]
        ys = [p["decode_weighted_accept_len"] for p in points]
        axes[0].plot([p["train_minutes"] for p in points], ys, marker="o", label=name)
        axes[1].plot([p["supervised_tokens"] / 1e6 for p in points], ys, marker="o", label=name)
    for axis, label in zip(axes, ("training wall minutes (this CPU)", "supervised block positions (millions)")):
        for ref_name, ref in results.get("references", {}).items():
            axis.axhline(ref["decode_weighted_accept_len"], linestyle=":", color="grey")
            axis.annotate(ref_name, (0, ref["decode_weighted_accept_len"]), xycoords=("axes fraction", "data"),
                          fontsize=7, color="grey")
        axis.set_xlabel(label)
        axis.set_ylabel("decode-weighted τ, held-out shards")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"dflash-hf recipe rows at equal compute ({results.get('cpu', '')})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return True


if __name__ == "__main__":
    main()
