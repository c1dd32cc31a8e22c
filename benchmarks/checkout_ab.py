"""Step cost of this checkout's DFlash loop against another checkout's, interleaved in one process.

On a shared host plain decoding drifts by 20 % between runs, so "before" and "after" numbers from two runs of
``step_profile.py`` cannot be compared. This loads the other checkout's ``dflash_hf`` under another package name
(make one with ``git worktree add /tmp/before COMMIT``), gives its drafter class the default pair's weights, and
runs, prompt by prompt and in alternating order, plain ``generate``, DFlash with the other checkout's code and
DFlash with this one's, on the same target. Each side uses its own loop, few-row plan and drafter code. Greedy,
float32, the shipped drafter and its drafts per step.

Printed per side: acceptance, speedup over plain, draft and verify milliseconds per step, (draft + verify) / plain
token and draft / plain token, and how many prompts gave the same tokens as plain.

    git worktree add /tmp/before HEAD~1
    python benchmarks/checkout_ab.py --before /tmp/before [--num-prompts 8] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

import dflash_hf.core.modeling_dflash  # noqa: F401  (our generate patch and import hook first; the other's nest in them)
from dflash_hf.machine import describe_cpu
from dflash_hf.tools.bench import load_prompt_file
from dflash_hf.training.data import chat_prompt_ids
from dflash_hf.training.default_pair import load_default_pair


def load_other_checkout(root: Path, name: str = "dflash_other") -> ModuleType:
    """``root/dflash_hf`` imported as package ``name`` (its relative imports stay inside it)."""
    package = root / "dflash_hf"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"{root} has no dflash_hf/__init__.py: pass the root of a checkout (git worktree add).")
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="root of the other checkout")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    other = load_other_checkout(args.before)
    target, tokenizer, drafter = load_default_pair()
    before = other.DFlashDraftModel(drafter.config).eval()
    before.load_state_dict(drafter.state_dict())
    before.num_speculative_tokens = drafter.num_speculative_tokens
    sides = {"plain": None, "before": before, "after": drafter}
    prompts = [torch.tensor([chat_prompt_ids(tokenizer, p)]) for p in load_prompt_file(None, args.num_prompts)]
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    for assistant in (before, drafter):  # warm-up: each side's few-row plan times its products here
        target.generate(prompts[0], assistant_model=assistant, **{**common, "max_new_tokens": 16})
    target.generate(prompts[0], **{**common, "max_new_tokens": 4})

    seconds = dict.fromkeys(sides, 0.0)
    tokens = dict.fromkeys(sides, 0)
    steps = dict.fromkeys(("before", "after"), 0)
    accepted = dict.fromkeys(("before", "after"), 0)
    draft_s = dict.fromkeys(("before", "after"), 0.0)
    verify_s = dict.fromkeys(("before", "after"), 0.0)
    same = dict.fromkeys(("before", "after"), 0)
    for i, ids in enumerate(prompts):
        order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
        outputs = {}
        for name, assistant in order:
            extra = {} if assistant is None else {"assistant_model": assistant}
            start = time.perf_counter()
            outputs[name] = target.generate(ids, **common, **extra)
            seconds[name] += time.perf_counter() - start
            tokens[name] += outputs[name].shape[1] - ids.shape[1]
            if assistant is not None:
                stats = assistant.last_stats
                steps[name] += stats.num_verify_steps
                accepted[name] += sum(stats.acceptance_lengths)
                draft_s[name] += stats.draft_time_s
                verify_s[name] += stats.verify_time_s
        for name in same:
            same[name] += torch.equal(outputs[name], outputs["plain"])
        print(f"prompt {i + 1}/{len(prompts)}: ms per token " +
              ", ".join(f"{name} {1e3 * seconds[name] / tokens[name]:.1f}" for name in sides), flush=True)

    plain_ms = 1e3 * seconds["plain"] / tokens["plain"]
    print(f"CPU: {describe_cpu()}; {torch.get_num_threads()} threads; {len(prompts)} prompts x "
          f"{args.max_new_tokens} new tokens; plain {plain_ms:.2f} ms per token")
    print(f"{'side':<8}{'acceptance':>11}{'speedup':>9}{'draft ms':>10}{'verify ms':>11}{'(d+v)/plain':>13}"
          f"{'draft/plain':>13}{'same as plain':>15}")
    for name in ("before", "after"):
        draft_ms, verify_ms = 1e3 * draft_s[name] / steps[name], 1e3 * verify_s[name] / steps[name]
        speedup = (seconds["plain"] / tokens["plain"]) / (seconds[name] / tokens[name])
        print(f"{name:<8}{accepted[name] / steps[name]:>11.3f}{speedup:>8.3f}x{draft_ms:>10.2f}{verify_ms:>11.2f}"
              f"{(draft_ms + verify_ms) / plain_ms:>13.3f}{draft_ms / plain_ms:>13.3f}"
              f"{same[name]:>11}/{len(prompts)}")


if __name__ == "__main__":
    main()
