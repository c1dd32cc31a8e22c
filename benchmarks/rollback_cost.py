"""Per-step cost of rolling back a hybrid (Gated-DeltaNet) target, against an attention-only twin.

Worst case on purpose: an untrained drafter, so nearly every block is rejected and every step restores the
linear-attention states and re-runs the accepted prefix. Tiny random models on the CPU, one thread; the point is
the ratio within one run, not the absolute times.

    python benchmarks/rollback_cost.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
import transformers

import dflash_hf

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
HYBRID = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
              linear_conv_kernel_dim=4,
              layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE))
    else:
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**SHAPE, **HYBRID))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.float().eval()


def measure(kind: str, steps: int, repeats: int) -> dict:
    target = build(kind)
    drafter = dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=8).float().eval()
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    target.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=drafter)  # warm-up
    best = None
    for _ in range(repeats):
        target.generate(prompt, max_new_tokens=steps, do_sample=False, assistant_model=drafter)
        stats = drafter.last_stats
        n = stats.num_verify_steps
        row = {"verify_ms_per_step": 1e3 * stats.verify_time_s / n, "rollback_ms_per_step": 1e3 * stats.rollback_time_s / n,
               "rollback_forwards": stats.num_rollback_forwards, "steps": n}
        best = row if best is None or row["verify_ms_per_step"] < best["verify_ms_per_step"] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {kind: measure(kind, args.steps, args.repeats) for kind in ("qwen3", "qwen3_5")}
    for kind, label in (("qwen3", "attention-only twin (qwen3)"), ("qwen3_5", "hybrid (qwen3_5)")):
        row = rows[kind]
        print(f"{label:<30} verify {row['verify_ms_per_step']:.2f} ms/step, of which rollback "
              f"{row['rollback_ms_per_step']:.2f} ms/step ({row['rollback_forwards']} re-runs in {row['steps']} steps)")
    hybrid = rows["qwen3_5"]
    print(f"rollback share of the hybrid's verify step: {hybrid['rollback_ms_per_step'] / hybrid['verify_ms_per_step']:.0%}")


if __name__ == "__main__":
    main()
