"""The ``dflash-hf`` command: demo, generate, bench, train, export, publish."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_PROMPT = "Explain in a few sentences why the sea is salty."


def _load_pair(target_path: str | None, drafter_path: str | None, dtype: str | None,
               drafter_dtype: str | None = None) -> tuple[Any, Any, Any]:
    """The offline default pair, or a target (transformers id/folder) and a drafter (id/folder).

    The drafter takes the target's dtype unless ``drafter_dtype`` is given (drafts are proposals: a bfloat16
    drafter of a float32 target changes speed and acceptance, never the output)."""
    torch_dtype = getattr(torch, dtype) if dtype else None
    if target_path is None:
        from .default_pair import default_drafter_dir, load_default_target

        target, tokenizer = load_default_target(torch_dtype)
        drafter_path = drafter_path or str(default_drafter_dir())
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target_path)
        target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch_dtype or "auto", device_map="auto").eval()
        if drafter_path is None:
            raise SystemExit("--drafter is required when --target is given.")
    from .modeling_dflash import DFlashDraftModel

    drafter_torch_dtype = getattr(torch, drafter_dtype) if drafter_dtype else target.dtype
    drafter = DFlashDraftModel.from_pretrained(drafter_path, dtype=drafter_torch_dtype).to(target.device).eval()
    return target, tokenizer, drafter


def _chat_ids(tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    from .data import chat_prompt_ids

    return torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=device)


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    started = time.perf_counter()
    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype)
    print(f"Loaded {target.config.name_or_path} + DFlash drafter (block {drafter.config.block_size}, "
          f"{drafter.config.num_hidden_layers} layers) in {time.perf_counter() - started:.1f} s\n")
    ids = _chat_ids(tokenizer, args.prompt, target.device)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    target.generate(ids, max_new_tokens=4, assistant_model=drafter)  # warm-up, so timings compare like with like
    print(f"> {args.prompt}\n")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    fast = target.generate(ids, assistant_model=drafter, streamer=streamer, **common)
    fast_s = time.perf_counter() - t0
    stats = drafter.last_stats
    t0 = time.perf_counter()
    plain = target.generate(ids, **common)
    plain_s = time.perf_counter() - t0
    new = fast.shape[1] - ids.shape[1]
    print()
    print(f"mean acceptance length : {stats.mean_acceptance_length:.2f} tokens per target forward "
          f"({stats.num_target_forwards} forwards for {new} tokens)")
    print(f"DFlash                 : {new / fast_s:.1f} tokens/s")
    print(f"plain generate         : {(plain.shape[1] - ids.shape[1]) / plain_s:.1f} tokens/s")
    print(f"speedup                : {plain_s / fast_s * new / max(1, plain.shape[1] - ids.shape[1]):.2f}x")
    print(f"identical to plain     : {torch.equal(fast, plain)}")
    return 0 if torch.equal(fast, plain) else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype)
    ids = _chat_ids(tokenizer, args.prompt, target.device)
    sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    target.generate(ids, assistant_model=drafter, streamer=streamer, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.eos_token_id, **sampling)
    print(f"\n[mean acceptance length {drafter.last_stats.mean_acceptance_length:.2f}]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, load_prompt_file, run_bench, sampling_acceptance, write_outputs

    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype)
    if args.num_speculative_tokens is not None:  # else the drafter's own default (its config, or all)
        drafter.num_speculative_tokens = args.num_speculative_tokens
    prompts = load_prompt_file(args.prompts, limit=args.num_prompts)
    if args.batch_size:
        return _bench_batches(args, target, tokenizer, drafter, prompts)
    results = run_bench(target, tokenizer, drafter, prompts, max_new_tokens=args.max_new_tokens)
    results["command"] = "dflash-hf " + " ".join(args.argv)
    if args.sampling_temperature is not None:
        results["sampling_acceptance"] = sampling_acceptance(
            target, tokenizer, drafter, prompts, args.sampling_temperature, args.max_new_tokens
        )
        results["sampling_temperature"] = args.sampling_temperature
    print(format_table(results))
    if "sampling_acceptance" in results:
        modes = ", ".join(f"{m} {v:.2f}" for m, v in results["sampling_acceptance"].items())
        print(f"sampling at temperature {args.sampling_temperature}: mean acceptance length {modes}")
    json_path, png_path = write_outputs(results, args.out)
    print(f"wrote {json_path} and {png_path}")
    return 0 if results["lossless"] else 1


def _bench_batches(args: argparse.Namespace, target: Any, tokenizer: Any, drafter: Any, prompts: list[str]) -> int:
    from .bench import format_batch_table, plot_batch_results, run_batch_bench
    from .data import atomic_write_text

    if max(args.batch_size) > len(prompts):
        raise SystemExit(f"--batch-size {max(args.batch_size)} needs at least that many prompts ({len(prompts)} given).")
    results = run_batch_bench(target, tokenizer, drafter, prompts, tuple(args.batch_size), args.max_new_tokens)
    results["command"] = "dflash-hf " + " ".join(args.argv)
    print(format_batch_table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_batch.json", json.dumps(results, indent=2) + "\n")
    plot_batch_results(results, out / "bench_batch.png")
    print(f"wrote {out / 'bench_batch.json'} and {out / 'bench_batch.png'}")
    return 0 if results["lossless"] else 1


def cmd_train(args: argparse.Namespace) -> int:
    from .data import atomic_write_text, count_records, load_prompts, magpie_prompts, read_jsonl, regenerate
    from .generation_dflash import validate_pair
    from .modeling_dflash import DFlashDraftModel
    from .training import (
        RECIPE_FILE,
        WARM_START_RECIPE,
        FeatureDataset,
        TrainConfig,
        extract_features,
        summarize_run,
        train_drafter,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "command.json", json.dumps({"command": "dflash-hf " + " ".join(args.argv)}))
    if args.target is None:
        from .default_pair import load_default_target

        target, tokenizer = load_default_target()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.target)
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype="auto", device_map="auto").eval()
    # Stage 1: prompts (saved once, so a resumed run regenerates the same ones) and the target's responses.
    @functools.cache
    def writer() -> Any:
        """The model that writes prompts and responses: the target, or its copy in --gen-dtype, made on first use
        (a resumed run with nothing left to write never holds two copies)."""
        if args.gen_dtype and getattr(torch, args.gen_dtype) != target.dtype:
            return copy.deepcopy(target).to(getattr(torch, args.gen_dtype))
        return target

    prompt_file = out / "prompts.jsonl"
    prompts = [r["prompt"] for r in read_jsonl(prompt_file)] if prompt_file.exists() else []
    if len(prompts) < args.num_prompts:
        # A new run, or a run grown with a larger --num-prompts: existing prompts (and their responses and
        # features) are kept, only the missing ones are made.
        if args.prompts:
            fresh = load_prompts(args.prompts, limit=args.num_prompts)
        else:
            fresh = magpie_prompts(writer(), tokenizer, args.num_prompts - len(prompts), seed=args.seed + len(prompts))
        known = set(prompts)
        prompts += [p for p in fresh if p not in known][: args.num_prompts - len(prompts)]
        atomic_write_text(prompt_file, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    timings = {}
    started = time.perf_counter()
    if count_records(out / "data") < len(prompts):
        gen_drafter = None
        if args.gen_drafter:  # regenerate with batched DFlash: same responses, fewer target forwards
            gen_drafter = DFlashDraftModel.from_pretrained(args.gen_drafter, dtype=writer().dtype)
            gen_drafter = gen_drafter.to(writer().device).eval()
            validate_pair(writer(), gen_drafter)
        regenerate(target if args.openai_base_url else writer(), tokenizer, prompts, out / "data",
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=args.gen_batch_size,
                   openai_base_url=args.openai_base_url, openai_model=args.openai_model, assistant_model=gen_drafter)
    writer.cache_clear()  # drop a --gen-dtype copy before feature extraction and training
    # Stage 2: the drafter's shape decides which layers to tap; features are cached for those.
    if args.init_from:  # warm start: continue from a trained drafter (its shape and taps win)
        drafter = DFlashDraftModel.from_pretrained(args.init_from, dtype=torch.float32)
        validate_pair(target, drafter)
        earlier = Path(args.init_from) / RECIPE_FILE
        if earlier.is_file():
            atomic_write_text(out / WARM_START_RECIPE, earlier.read_text(encoding="utf-8"))
    else:
        drafter = DFlashDraftModel.from_target(
            target, num_hidden_layers=args.num_layers, block_size=args.block_size, num_taps=args.num_taps,
            mask_token_id=args.mask_token_id, init_from_target=args.init_from_target,
        ).float()
    timings["data"] = time.perf_counter() - started
    started = time.perf_counter()
    extract_features(target, out / "data", out / "features", drafter.config.target_layer_ids)
    timings["features"] = time.perf_counter() - started
    if args.steps == 0:  # data and features only; a later invocation with --steps trains on them
        _add_timings(out, timings)
        print(f"data and features ready in {out} (--steps 0: no training)")
        return 0
    # Stage 3: training (resumes from the newest checkpoint unless --no-resume).
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, num_anchors=args.num_anchors, lr=args.lr,
                         seed=args.seed, save_every=args.save_every, mixed_precision=args.mixed_precision)
    started = time.perf_counter()
    train_drafter(drafter, target, FeatureDataset(out / "features"), out / "checkpoints", config,
                  resume=not args.no_resume)
    timings["training"] = time.perf_counter() - started
    drafter.config.name_or_path = f"{Path(args.out).name}"
    drafter.save_pretrained(out / "drafter")
    _add_timings(out, timings)
    atomic_write_text(out / "training.json", json.dumps(summarize_run(out), indent=2, ensure_ascii=False) + "\n")
    print(f"drafter saved to {out / 'drafter'}; recipe in {out / 'training.json'} (dflash-hf export --training-json)")
    return 0


def _add_timings(run_dir: Path, timings: dict[str, float]) -> None:
    """Wall time per stage, summed over every invocation of a run folder (a resumed run adds what it redid)."""
    from .data import atomic_write_text

    path = run_dir / "timings.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    totals = {**earlier, **{stage: earlier.get(stage, 0.0) + seconds for stage, seconds in timings.items()}}
    atomic_write_text(path, json.dumps(totals))


def _add_pair_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="transformers model id or folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", help="DFlash drafter id or folder (default: the shipped drafter)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="target dtype")
    parser.add_argument("--drafter-dtype", choices=["float32", "bfloat16", "float16"],
                        help="drafter dtype (default: the target's); never changes the output, only speed and acceptance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="stream an answer with the offline default pair and report the speedup")
    _add_pair_args(demo)
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate with a DFlash drafter, streaming")
    _add_pair_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="plain vs DFlash vs prompt lookup, side by side; JSON + PNG")
    _add_pair_args(bench)
    bench.add_argument("--prompts", help="JSONL prompt file (default: the shipped held-out prompts)")
    bench.add_argument("--num-prompts", type=int)
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--num-speculative-tokens", type=int, metavar="K",
                       help="verify K drafts per step (default: the drafter's num_speculative_tokens, else all "
                            "block_size - 1)")
    bench.add_argument("--batch-size", type=int, nargs="+", metavar="N",
                       help="instead: plain batched generate vs batched DFlash at these batch sizes (e.g. 1 2 4 8)")
    bench.add_argument("--sampling-temperature", type=float,
                       help="also measure the acceptance of strict vs ratio sampling at this temperature")
    bench.set_defaults(func=cmd_bench)

    train = sub.add_parser("train", help="regenerate data with the target, cache features, train a drafter")
    train.add_argument("--target", help="transformers model id or folder (default: offline SmolLM2-135M-Instruct)")
    train.add_argument("--out", required=True, help="run folder (data, features, checkpoints, drafter)")
    train.add_argument("--prompts", help="JSONL file or datasets id of prompts (default: Magpie prompts from the target)")
    train.add_argument("--num-prompts", type=int, default=1000)
    train.add_argument("--max-new-tokens", type=int, default=192)
    train.add_argument("--temperature", type=float, default=0.0, help="response sampling temperature (0 = greedy)")
    train.add_argument("--gen-batch-size", type=int, default=32)
    train.add_argument("--gen-dtype", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the target while it writes prompts and responses (default: the target's). "
                            "bfloat16 is much faster on CPUs with AVX512-BF16; greedy responses may then differ "
                            "from the float32 target's at near-ties. Features are always taken in the target's dtype.")
    train.add_argument("--gen-drafter", help="a DFlash drafter of the target: regenerate responses with batched DFlash")
    train.add_argument("--openai-base-url", help="regenerate through an OpenAI-compatible server instead")
    train.add_argument("--openai-model")
    train.add_argument("--num-layers", type=int, default=2)
    train.add_argument("--block-size", type=int, default=8)
    train.add_argument("--num-taps", type=int, default=5)
    train.add_argument("--mask-token-id", type=int)
    train.add_argument("--init-from-target", action="store_true")
    train.add_argument("--init-from", help="start from this trained drafter (folder or id) instead of a new one")
    train.add_argument("--steps", type=int, default=1500)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--num-anchors", type=int, default=16)
    train.add_argument("--lr", type=float, default=6e-4)
    train.add_argument("--save-every", type=int, default=200)
    train.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                       help="autocast the training forward (bf16: much faster on GPUs and CPUs with AVX512-BF16)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-resume", action="store_true")
    train.set_defaults(func=cmd_train)

    try:
        from .hub import add_cli
    except ImportError:
        add_cli = None
    if add_cli is not None:
        add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
