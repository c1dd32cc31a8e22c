"""Can the recipe fit at all? (the drafter campaign, issue 30 item 3)

Trains a drafter on the first N conversations of ShareGPT's train split until it has memorised them, then measures
its acceptance ONLINE, in the real decode loop, on those same N prompts, beside the shipped drafter. A recipe and
loop without a bug must get high acceptance here (the bar is 4); if it cannot, something between training and
decoding disagrees, or the drafter lacks capacity.

The responses are written by plain greedy ``generate`` of the float32 default target, one prompt at a time: the
exact numerics the online measurement verifies against. The campaign's committed data (bfloat16, batch 8) is not
used because plain float32 decoding leaves it early (on its first 8 conversations: at token 30 of 192, median),
so a memorised drafter would be measured against a continuation it never saw.

    python benchmarks/fit_check.py --work-dir runs/fit --conversations 50 --steps 400

Resumable: the responses, features and checkpoints in ``--work-dir`` are reused when rerun with the same options.
Writes ``fit.json`` there and prints teacher-forced and online acceptance side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dflash_hf import DFlashDraftModel
from dflash_hf.fileio import atomic_write_text
from dflash_hf.machine import describe_cpu
from dflash_hf.training.campaign import has_native_bfloat16, validation_acceptance
from dflash_hf.training.data import generate_responses, write_shards
from dflash_hf.training.default_pair import default_drafter_dir, load_default_target
from dflash_hf.training.prompt_sources import training_conversations
from dflash_hf.training.trainer import (
    FeatureDataset,
    TrainConfig,
    extract_features,
    teacher_forced_acceptance,
    train_drafter,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/fit")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-anchors", type=int, default=64)
    parser.add_argument("--from-scratch", action="store_true", help="a new drafter instead of the shipped one")
    args = parser.parse_args()

    work = Path(args.work_dir)
    target, tokenizer = load_default_target(torch.float32)
    conversations = training_conversations("sharegpt", args.conversations, seed=0, max_turns=1)
    prompts = [c["turns"][0] for c in conversations]
    print(f"machine: {describe_cpu()}")

    if not (work / "data" / "shard-00000.jsonl").exists():
        records = generate_responses(target, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=1)
        write_shards(records, work / "data", shard_size=10**9)
    # float32 taps: what the drafter sees when it decodes beside a float32 target
    extract_features(target, work / "data", work / "features", DFlashDraftModel.from_pretrained(
        default_drafter_dir()).config.target_layer_ids, dtype=torch.float32)
    dataset = FeatureDataset(work / "features")

    shipped = DFlashDraftModel.from_pretrained(default_drafter_dir(), dtype=torch.float32).eval()
    drafter = DFlashDraftModel.from_pretrained(default_drafter_dir(), dtype=torch.float32)
    if args.from_scratch:
        drafter = DFlashDraftModel(drafter.config).to(torch.float32)
    config = TrainConfig(steps=args.steps, batch_size=4, num_anchors=args.num_anchors, lr=args.lr, warmup_ratio=0.02,
                         save_every=50, mixed_precision="bf16" if has_native_bfloat16() else "no")
    train_drafter(drafter, target, dataset, work / "checkpoints", config, resume=True)
    drafter.eval()

    teacher_forced = {name: teacher_forced_acceptance(d, target, dataset, args.num_anchors)["accept_len"]
                      for name, d in (("shipped", shipped), ("fit", drafter))}
    online = validation_acceptance(target, tokenizer, {"shipped": shipped, "fit": drafter}, prompts,
                                   args.max_new_tokens)
    result = {"cpu": describe_cpu(), "conversations": len(prompts), "max_new_tokens": args.max_new_tokens,
              "steps": args.steps, "lr": args.lr, "num_anchors": args.num_anchors,
              "start": "scratch" if args.from_scratch else "shipped drafter",
              "teacher_forced_accept_len": teacher_forced, "online": online}
    atomic_write_text(work / "fit.json", json.dumps(result, indent=2) + "\n")
    print("drafter   teacher-forced   online (same prompts)   identical to plain")
    for name in ("shipped", "fit"):
        print(f"{name:8s}  {teacher_forced[name]:14.2f}   {online[name]['mean_acceptance_length']:21.2f}   "
              f"{online[name]['identical_to_plain']}/{online[name]['prompts']}")
    print(f"wrote {work / 'fit.json'}")


if __name__ == "__main__":
    main()
