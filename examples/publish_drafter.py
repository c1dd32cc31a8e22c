"""Export a trained drafter with a model card, then publish it (dry run unless --upload).

    python examples/publish_drafter.py runs/demo/drafter out/my-drafter --repo-id me/my-drafter \
        --base-model HuggingFaceTB/SmolLM2-135M-Instruct [--bench-json bench-results/bench.json] [--upload]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dflash_hf.tools.hub import export_drafter, publish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--bench-json")
    parser.add_argument("--training-json", help="the run's training.json: the recipe goes on the card and into the folder")
    parser.add_argument("--upload", action="store_true", help="really upload (needs HF_TOKEN or `hf auth login`)")
    args = parser.parse_args()
    recipe = json.loads(Path(args.training_json).read_text(encoding="utf-8")) if args.training_json else None
    folder = export_drafter(args.checkpoint, args.out_dir, base_model=args.base_model, bench_json=args.bench_json,
                            model_name=args.repo_id, training_summary=recipe)
    files = publish(folder, args.repo_id, dry_run=not args.upload)
    print(("uploaded" if args.upload else "would upload") + f" to {args.repo_id}:")
    for name in files:
        print("  " + name)


if __name__ == "__main__":
    main()
