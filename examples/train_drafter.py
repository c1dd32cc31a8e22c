"""Train a DFlash drafter for a target from the target's own outputs: `dflash-hf train` as a script.

Small CPU example (the default offline target, a few prompts, a few steps):
    python examples/train_drafter.py --out runs/demo --num-prompts 8 --max-new-tokens 32 --steps 20
For a real target on GPUs (several processes): accelerate launch examples/train_drafter.py --target Qwen/Qwen3-8B ...
"""

from __future__ import annotations

import sys

from dflash_hf.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
