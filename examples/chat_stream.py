"""A streaming chat loop with DFlash (offline default pair unless --target/--drafter are given).

    python examples/chat_stream.py                                        # interactive
    echo "Hello" | python examples/chat_stream.py                         # one turn per input line
    python examples/chat_stream.py --target Qwen/Qwen3-8B --drafter z-lab/Qwen3-8B-DFlash-b16
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from dflash_hf import DFlashDraftModel
from dflash_hf.training.default_pair import default_drafter_dir, load_default_target


def load(target_id: str | None, drafter_id: str | None) -> tuple[Any, Any, Any]:
    """(target, tokenizer, drafter): the offline default target unless ``target_id``, the shipped drafter unless
    ``drafter_id``."""
    if target_id is None:
        target, tokenizer = load_default_target()
    else:
        tokenizer = AutoTokenizer.from_pretrained(target_id)
        target = AutoModelForCausalLM.from_pretrained(target_id, dtype="auto", device_map="auto").eval()
    drafter = DFlashDraftModel.from_pretrained(drafter_id or default_drafter_dir(), dtype=target.dtype)
    return target, tokenizer, drafter.to(target.device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="transformers model id or folder (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", help="DFlash drafter id or folder (default: the shipped drafter; required with "
                                          "--target)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens per reply at most")
    args = parser.parse_args()
    if args.target is not None and args.drafter is None:
        parser.error("--drafter is required with --target (the shipped drafter belongs to the default target)")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    target, tokenizer, drafter = load(args.target, args.drafter)
    history: list[dict] = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), "/exit"):
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(target.device)
        out = target.generate(**inputs, assistant_model=drafter, streamer=streamer,
                              max_new_tokens=args.max_new_tokens, do_sample=False)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        print(f"[acceptance length {drafter.last_stats.mean_acceptance_length:.2f}]")


if __name__ == "__main__":
    main()
