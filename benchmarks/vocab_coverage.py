"""How much of the target's answers a reduced draft vocabulary can draft at all.

Prints the coverage of a drafter's ``draft_vocab`` on a run folder's response tokens, and of the N most frequent
tokens chosen from the first part of the run on the rest of it (tokens outside the vocabulary are misses whatever
the drafter learns). With ``--widen-to N --save DIR`` it also writes the drafter with its vocabulary widened to the
union with the run's N most frequent tokens, untrained, for an online check with ``recipe_ablation.py --variant
base --init-from DIR``.

    python benchmarks/vocab_coverage.py --run /work/runs/sg --drafter /work/runs/sg/drafter --sizes 8192 16384 \
        --widen-to 16384 --save /tmp/v16k
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dflash_hf import DFlashDraftModel
from dflash_hf.training.data import load_records
from dflash_hf.training.default_pair import load_default_target
from dflash_hf.training.pipeline import target_eos_ids
from dflash_hf.training.trainer import draft_vocabulary, vocabulary_coverage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder with data/")
    parser.add_argument("--drafter", required=True, help="drafter folder with a draft_vocab")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384], help="vocabulary sizes to try")
    parser.add_argument("--held-out", type=float, default=0.2, help="last fraction of the run to measure on")
    parser.add_argument("--widen-to", type=int, default=None, help="write the drafter widened by the top N")
    parser.add_argument("--save", type=Path, default=None, help="folder for the widened drafter")
    args = parser.parse_args()
    if (args.widen_to is None) != (args.save is None):
        parser.error("--widen-to and --save go together")
    return args


def main() -> None:
    args = parse_args()
    records = load_records(args.run / "data")
    drafter = DFlashDraftModel.from_pretrained(args.drafter)
    if drafter.config.draft_vocab is None:
        raise SystemExit(f"{args.drafter} drafts from the whole vocabulary; there is nothing to measure.")
    print(f"the drafter's {len(drafter.config.draft_vocab)} tokens hold "
          f"{vocabulary_coverage(records, drafter.config.draft_vocab):.1%} of the {len(records)} conversations' answers")
    cut = int(len(records) * (1 - args.held_out))
    for size in args.sizes:
        vocab = draft_vocabulary(records[:cut], size)
        print(f"top {size} of the first {cut}: {vocabulary_coverage(records[cut:], vocab):.1%} "
              f"of the other {len(records) - cut}")
    if args.widen_to is not None:
        target, _ = load_default_target()
        wider = draft_vocabulary(records, args.widen_to, target_eos_ids(target))
        drafter.config.draft_vocab = sorted(set(drafter.config.draft_vocab) | set(wider))
        print(f"widened: {len(drafter.config.draft_vocab)} tokens, "
              f"{vocabulary_coverage(records, drafter.config.draft_vocab):.1%} of the answers; saved to {args.save}")
        drafter.save_pretrained(args.save)


if __name__ == "__main__":
    main()
