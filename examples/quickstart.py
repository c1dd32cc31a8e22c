"""Quickstart: Qwen3-8B + z-lab's DFlash drafter on a GPU with Hub access; else the offline default pair.

    python examples/quickstart.py [--max-new-tokens 256] [--offline]
"""

from __future__ import annotations

import argparse
import time

import torch

import dflash_hf

HUB_TARGET, HUB_DRAFTER = "Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16"


def load_pair(offline: bool):
    if not offline and torch.cuda.is_available():
        try:
            from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(HUB_TARGET)
            target = AutoModelForCausalLM.from_pretrained(HUB_TARGET, dtype="auto", device_map="cuda")
            drafter = AutoModel.from_pretrained(HUB_DRAFTER, trust_remote_code=True, dtype="auto").to("cuda")
            return target, tokenizer, drafter
        except OSError as error:  # no network / no access to the Hub
            print(f"Hub models unavailable ({type(error).__name__}); using the offline default pair instead.")
    else:
        print("No GPU (or --offline): using the offline default pair (SmolLM2-135M-Instruct + its drafter).")
    return dflash_hf.load_default_pair()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--offline", action="store_true")
    args = parser.parse_args()
    target, tokenizer, drafter = load_pair(args.offline)
    messages = [{"role": "user", "content": "Write three facts about octopuses."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(target.device)
    start = time.perf_counter()
    out = target.generate(**inputs, assistant_model=drafter, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out.shape[1] - inputs["input_ids"].shape[1]
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    stats = drafter.last_stats
    print(f"\n{new} tokens in {seconds:.2f} s; mean acceptance length {stats.mean_acceptance_length:.2f}")


if __name__ == "__main__":
    main()
