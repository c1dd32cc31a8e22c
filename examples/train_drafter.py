"""Train a DFlash drafter for a target from the target's own outputs, with the training library.

Takes every option of `dflash-hf train` (python examples/train_drafter.py --help) and runs the same pipeline.
Small CPU example (the default offline target, a few prompts, a few steps):
    python examples/train_drafter.py --out runs/demo --num-prompts 8 --max-new-tokens 32 --steps 20
For a real target on GPUs (several processes): accelerate launch examples/train_drafter.py --target Qwen/Qwen3-8B ...

In your own code, the spec is a dataclass:
    from dflash_hf.training.pipeline import TrainSpec, run_pipeline
    drafter_dir = run_pipeline(TrainSpec(out="runs/demo", num_prompts=8, max_new_tokens=32, steps=20))
"""

from __future__ import annotations

from dflash_hf.training.options import train_parser
from dflash_hf.training.pipeline import TrainInputError, TrainSpec, run_pipeline


def main() -> int:
    parser = train_parser(prog="train_drafter.py")
    args = parser.parse_args()
    try:
        spec = TrainSpec.from_args(args)  # checks the options that exclude each other
    except ValueError as err:
        parser.error(str(err))
    try:
        run_pipeline(spec)
    except TrainInputError as err:  # e.g. a drafter the target cannot take: found before anything is written
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
