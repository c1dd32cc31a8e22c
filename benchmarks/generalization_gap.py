"""How much of a drafter's training-time acceptance carries over to conversations it never saw.

Teacher-forced acceptance (the target's own tokens as context, as the trainer measures it) on the feature shards the
drafter was trained on, against the same measurement on shards a grown run added afterwards (same source, same split,
never trained on). A large gap says the drafter memorises its data and more data is the lever; a small gap with a
low online acceptance would point at a difference between training and decoding instead. The number to hold
against the online acceptance of the decode loop is the decode-weighted one (``teacher_forced_acceptance``: steps
land more often where acceptance is low).

    python benchmarks/generalization_gap.py --run /work/runs/sg --drafter hub_upload/SmolLM2-135M-Instruct-DFlash \
        --trained 12-27 --unseen 32-47

Writes ``RUN/generalization_gap.json`` (one entry per drafter and pair of shard ranges, replaced on rerun).
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
from dflash_hf.training.default_pair import load_default_target
from dflash_hf.training.trainer import FeatureDataset, teacher_forced_acceptance


def shard_range(text: str) -> range:
    """``"12-27"`` -> shards 12 … 27 (both ends included); ``"7"`` -> shard 7."""
    first, _, last = text.partition("-")
    try:
        return range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard range; write FIRST-LAST, e.g. 12-27") from None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder with features/")
    parser.add_argument("--drafter", required=True, help="drafter folder")
    parser.add_argument("--trained", required=True, type=shard_range, help="shards the drafter was trained on")
    parser.add_argument("--unseen", required=True, type=shard_range, help="shards it never saw")
    parser.add_argument("--num-anchors", type=int, default=64, help="blocks per sequence (default: 64)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    target, _ = load_default_target()
    drafter = DFlashDraftModel.from_pretrained(args.drafter).eval()
    entry = {"drafter": str(args.drafter), "num_anchors": args.num_anchors,
             "cpu": cpu_facts()["cpu_model"]}
    for name, shards in (("trained", args.trained), ("unseen", args.unseen)):
        started = time.perf_counter()
        dataset = FeatureDataset(args.run / "features", shards=shards)
        result = teacher_forced_acceptance(drafter, target, dataset, args.num_anchors)
        rounded = {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}
        entry[name] = {"shards": f"{shards.start}-{shards.stop - 1}", **rounded}
        print(f"{name:>8}: shards {entry[name]['shards']}, {result['examples']} sequences, {result['blocks']} blocks: "
              f"teacher-forced τ {result['accept_len']:.3f} (decode-weighted {result['decode_weighted_accept_len']:.3f}), "
              f"slot-1 accuracy {result['acc_slot1']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    entry["gap"] = round(entry["trained"]["accept_len"] - entry["unseen"]["accept_len"], 4)
    print(f"gap: {entry['gap']:.3f} ({entry['cpu']})")
    path = args.run / "generalization_gap.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if _key(e) != _key(entry)] + [entry]
    atomic_write_text(path, json.dumps(entries, indent=2) + "\n")


def _key(entry: dict) -> tuple[str, str, str]:
    return entry["drafter"], entry["trained"]["shards"], entry["unseen"]["shards"]


if __name__ == "__main__":
    main()
