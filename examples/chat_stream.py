"""A streaming chat loop with DFlash (offline default pair unless --target/--drafter are given).

    python examples/chat_stream.py                 # interactive
    echo "Hello" | python examples/chat_stream.py  # one turn per input line
"""

from __future__ import annotations

import argparse
import sys

from transformers import TextStreamer

import dflash_hf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=200)
    args = parser.parse_args()
    target, tokenizer, drafter = dflash_hf.load_default_pair()
    history: list[dict] = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), "/exit"):
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        out = target.generate(**inputs, assistant_model=drafter, streamer=streamer,
                              max_new_tokens=args.max_new_tokens, do_sample=False)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        print(f"[acceptance length {drafter.last_stats.mean_acceptance_length:.2f}]")


if __name__ == "__main__":
    main()
