"""Try an exact mode for reduced-precision targets (issue 31 item 2): products and attention whose per-row result
does not depend on how many rows a forward carries, used by plain decoding and DFlash alike.

In bfloat16 a verify forward over n + 1 positions computes each position with other kernels (other GEMM blocking,
other attention splits) than one-row decoding does, so near-ties can flip. Under this mode:

- every linear layer given at most ``ROWS`` rows pads them to ``ROWS`` (one GEMM shape for a decode step and a
  verify block alike: a row's outputs then come from the same kernel and reduction order whatever the others are);
- attention over at most ``ROWS`` queries runs each query on its own, over exactly the keys it may see, in the
  same ops as a one-query decode step (longer forwards, the prefill, run the target's usual attention: they are
  the same in both methods).

The script counts, on the shipped held-out prompts, how often DFlash's output equals plain decoding's with and
without the mode, and what the mode costs each of them, interleaved prompt by prompt. A prototype: batch 1,
no padding (each query's keys are a prefix of the cache), the default pair.

    python benchmarks/row_invariant_check.py --num-prompts 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dflash_hf import load_default_pair
from dflash_hf.machine import describe_cpu
from dflash_hf.tools.bench import load_prompt_file
from dflash_hf.training.data import chat_prompt_ids

ROWS = 16  # every few-row product is computed as this many rows


def _padded_linear(layer: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > ROWS:
            return F.linear(x, layer.weight, layer.bias)
        flat = x.reshape(rows, x.shape[-1])
        padded = flat.new_zeros(ROWS, flat.shape[1])
        padded[:rows] = flat
        return F.linear(padded, layer.weight, layer.bias)[:rows].reshape(*x.shape[:-1], -1)
    return forward


def row_invariant_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, H, q, d], key/value [B, Hkv, k, d] -> ([B, q, H, d], None); each of at most ROWS queries alone."""
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len > ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    outs = []
    for i in range(q_len):  # query i sees the cache before the block and the block up to itself
        seen = k_len - q_len + i + 1
        scores = torch.matmul(query[:, :, i : i + 1], key[:, :, :seen].transpose(-1, -2)).float() * scale
        outs.append(torch.matmul(scores.softmax(dim=-1).to(value.dtype), value[:, :, :seen]))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register("row_invariant", row_invariant_attention)


@contextlib.contextmanager
def row_invariant(target: torch.nn.Module):
    """Within the block, every forward of ``target`` (plain or DFlash) runs in the row-invariant mode."""
    layers = [m for m in target.modules() if type(m) is torch.nn.Linear]
    for layer in layers:
        layer.forward = _padded_linear(layer)
    before = target.config._attn_implementation
    target.set_attn_implementation("row_invariant")
    try:
        yield
    finally:
        target.set_attn_implementation(before)
        for layer in layers:
            del layer.forward


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    target, tokenizer, drafter = load_default_pair(dtype=getattr(torch, args.dtype))
    drafter.num_speculative_tokens = 7
    greedy = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    prompts = load_prompt_file(None, limit=args.num_prompts)
    seconds = {k: 0.0 for k in ("plain", "dflash", "plain_exact", "dflash_exact")}
    tokens = {k: 0 for k in seconds}
    same = {"usual": 0, "exact": 0, "exact_plain_vs_usual_plain": 0}
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
        runs = {}
        order = ["usual", "exact"] if index % 2 == 0 else ["exact", "usual"]
        for mode in order:
            with row_invariant(target) if mode == "exact" else contextlib.nullcontext():
                suffix = "_exact" if mode == "exact" else ""
                plain, t_plain = _timed(lambda: target.generate(ids, **greedy))
                fast, t_fast = _timed(lambda: target.generate(ids, assistant_model=drafter, **greedy))
            runs[mode] = plain
            same[mode] += torch.equal(plain, fast)
            for name, out, t in (("plain", plain, t_plain), ("dflash", fast, t_fast)):
                seconds[name + suffix] += t
                tokens[name + suffix] += out.shape[1] - ids.shape[1]
        same["exact_plain_vs_usual_plain"] += torch.equal(runs["usual"], runs["exact"])
        print(f"prompt {index}: identical usual {same['usual']}/{index + 1}, exact {same['exact']}/{index + 1}",
              flush=True)
    rate = {k: tokens[k] / seconds[k] for k in seconds}
    print(f"machine: {describe_cpu()}; target {args.dtype}; {len(prompts)} prompts, {args.max_new_tokens} tokens")
    print(f"DFlash identical to plain: usual kernels {same['usual']}/{len(prompts)}, "
          f"row-invariant mode {same['exact']}/{len(prompts)}")
    print(f"plain under the mode identical to plain without it: {same['exact_plain_vs_usual_plain']}/{len(prompts)}")
    print(f"tokens/s: plain {rate['plain']:.1f}, DFlash {rate['dflash']:.1f} ({rate['dflash'] / rate['plain']:.2f}x); "
          f"under the mode: plain {rate['plain_exact']:.1f} ({rate['plain_exact'] / rate['plain']:.2f}x of plain), "
          f"DFlash {rate['dflash_exact']:.1f} ({rate['dflash_exact'] / rate['plain_exact']:.2f}x of plain under it)")


if __name__ == "__main__":
    main()
