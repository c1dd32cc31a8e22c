"""Benchmark the default pair (or any pair) and write bench.json + bench.png: `dflash-hf bench` as a script.

    python examples/benchmark.py --num-prompts 4 --max-new-tokens 64 --out bench-results
"""

from __future__ import annotations

import sys

from dflash_hf.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
