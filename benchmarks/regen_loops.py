"""Local regeneration, the two batch loops side by side: ``generate`` on padded batches (every row computed until
its batch's longest answer ends) against continuous batching (``greedy_continuous``: rows leave as they finish
and waiting ones join).

Both answer the same conversations of a training source's train split (the campaign's seeded order, from
``--skip`` on) with the default target in one dtype, shard by shard as the campaign does (``--shard-size``
conversations a call, ``--batch-size`` rows in flight), on the same CPU in the same run; the loops alternate by
shard so that drift on a shared machine falls on both. Prints tokens/s of each, their ratio, and how
many conversations came out identical (the loops differ only in the batch a step runs in, which in bfloat16 can
flip near-ties, as plain batch sizes do).

    python benchmarks/regen_loops.py --source sharegpt --conversations 64 --batch-size 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dflash_hf.fileio import atomic_write_text
from dflash_hf.machine import describe_cpu
from dflash_hf.training.data import generate_responses
from dflash_hf.training.default_pair import load_default_target
from dflash_hf.training.prompt_sources import TRAINING_SOURCES, training_conversations

LOOPS = {"generate": "generate", "continuous": "auto"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=TRAINING_SOURCES, default="sharegpt")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--skip", type=int, default=3000, help="start this far into the seeded order (default: "
                        "3000, past what the campaign has committed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64, help="conversations a call, as the campaign's shards")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="the campaign's (default: 192)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    target, tokenizer = load_default_target(getattr(torch, args.dtype))
    conversations = training_conversations(args.source, args.skip + args.conversations)[args.skip:]
    seconds = dict.fromkeys(LOOPS, 0.0)
    tokens = dict.fromkeys(LOOPS, 0)
    identical = 0
    for first in range(0, len(conversations), args.shard_size):
        chunk = conversations[first : first + args.shard_size]
        answers = {}
        for name, loop in LOOPS.items():
            started = time.perf_counter()
            answers[name] = list(generate_responses(target, tokenizer, chunk, max_new_tokens=args.max_new_tokens,
                                                    batch_size=args.batch_size, batch_loop=loop))
            seconds[name] += time.perf_counter() - started
            tokens[name] += sum(end - start for r in answers[name] for start, end in r["response_spans"])
        identical += sum(a["input_ids"] == b["input_ids"] for a, b in zip(answers["generate"], answers["continuous"]))
        rates = {name: tokens[name] / seconds[name] for name in LOOPS}
        print(f"{first + len(chunk)}/{len(conversations)} conversations: generate {rates['generate']:.0f} tokens/s, "
              f"continuous {rates['continuous']:.0f} tokens/s", flush=True)
    rates = {name: tokens[name] / seconds[name] for name in LOOPS}
    result = {"cpu": describe_cpu(), "source": args.source, "conversations": len(conversations),
              "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
              "tokens": tokens, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
              "speedup": round(rates["continuous"] / rates["generate"], 3), "identical": identical}
    print(f"\n{describe_cpu()}; {args.source}, {len(conversations)} conversations, batch {args.batch_size}, "
          f"{args.dtype}: generate {rates['generate']:.0f} tokens/s, continuous batching {rates['continuous']:.0f} tokens/s "
          f"({result['speedup']:.2f}x); identical answers {identical}/{len(conversations)}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
