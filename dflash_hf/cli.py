"""The dflash-hf command: demo, generate, bench, train, export-target, export, publish.

Arguments are checked when they are parsed, before any model loads; torch and transformers are imported inside
the commands, so that ``dflash-hf --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .machine import dtype_name
from .training.loading import input_errors_as, load_drafter, load_target, require_drafter
from .training.options import (
    DTYPES,
    SUITE_NAMES,
    TRAIN_DESCRIPTION,
    HelpFormatter,
    add_train_options,
    bench_prompt_source,
    drafts_per_step,
    duration,
    float_above,
    float_in_unit,
    fraction,
    int_in_range,
    model_source,
    output_folder,
)

# The first of assets/bench_prompts.jsonl (held out from training; its answer runs past 128 tokens; a test checks).
DEFAULT_PROMPT = "Explain why the sky looks blue during the day and red at sunset."
DESCRIPTION = (
    "DFlash speculative decoding for transformers: a small block-diffusion drafter proposes a block of tokens, "
    "the target verifies it in one forward, and the output is what plain generate returns."
)


class CommandError(Exception):
    """A problem with the command's inputs found after parsing: printed as ``dflash-hf: error: …``, exit 2."""


def _reported() -> contextlib.AbstractContextManager[None]:
    return input_errors_as(CommandError)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _load_pair(target_path: str | None, drafter_path: str | None, dtype: str | None,
               drafter_dtype: str | None = None, calibration: Any = None) -> tuple[Any, Any, Any]:
    """The offline default pair, or a target (transformers id/folder) and a drafter (id/folder).

    The drafter takes the target's dtype unless ``drafter_dtype`` is given (drafts are proposals: a bfloat16
    drafter of a float32 target changes speed and acceptance, never the output). "auto": the target's dtype, or
    whichever ``fastest_drafter_dtype`` measures faster on this machine (read from ``calibration`` when an
    earlier command measured it), said on stderr."""
    import torch

    with _reported():
        if drafter_path is not None:
            require_drafter(drafter_path)  # before the target: a wrong drafter fails in a second
        target, tokenizer = load_target(target_path, getattr(torch, dtype) if dtype else None)
        if drafter_path is None:
            from .training.default_pair import default_drafter_dir

            drafter_path = str(default_drafter_dir())
        chosen = drafter_dtype not in (None, "auto")
        drafter = load_drafter(drafter_path, target, getattr(torch, drafter_dtype) if chosen else target.dtype)
    if drafter_dtype == "auto":
        _to_fastest_dtype(target, drafter, calibration)
    return target, tokenizer, drafter


def _to_fastest_dtype(target: Any, drafter: Any, calibration: Any = None) -> None:
    """Cast ``drafter`` to the dtype it drafts fastest in here (``fastest_drafter_dtype``, or the calibration's
    answer from an earlier run) and say what was measured."""
    from .tools.calibration import Calibration

    calibration = calibration or Calibration.load()
    dtype, timings, cached = calibration.fastest_drafter_dtype(target, drafter)
    if timings:
        measured = ", ".join(f"{dtype_name(d)} {1e3 * s:.1f} ms" for d, s in timings.items())
        when = f"cached in {calibration.path}; --recalibrate measures again" if cached else "measured now"
        print(f"dflash-hf: drafter dtype {dtype_name(dtype)} (one draft on this machine: "
              f"{measured}; {when}; --drafter-dtype overrides)", file=sys.stderr)
    drafter.to(dtype)


@contextlib.contextmanager
def _machine_calibration(args: argparse.Namespace) -> Iterator[None]:
    """For commands that load a pair: this machine's cached calibration is read before the command (``args.
    calibration``) and what it measured is saved after it, so that the next command measures nothing."""
    if not hasattr(args, "recalibrate"):
        yield
        return
    from .tools.calibration import Calibration

    args.calibration = calibration = Calibration.load(refresh=args.recalibrate or None)
    calibration.prime()
    try:
        yield
    finally:
        if calibration.record() or calibration.unsaved:
            try:
                calibration.save()
            except OSError as err:  # a read-only cache costs the next run its calibration, not this run
                print(f"dflash-hf: could not cache this machine's calibration in {calibration.path}: {err}",
                      file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# demo, generate
# ----------------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    started = time.perf_counter()
    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype,
                                            args.calibration)
    print(f"Loaded {target.config.name_or_path} + DFlash drafter (block {drafter.config.block_size}, "
          f"{drafter.config.num_hidden_layers} layers) in {time.perf_counter() - started:.1f} s")
    _set_drafts_per_step(args, target, drafter)
    return run_demo(target, tokenizer, drafter, args.prompt, max_new_tokens=args.max_new_tokens,
                    repeats=args.repeats, calibration=args.calibration)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype,
                                            args.calibration)
    _set_drafts_per_step(args, target, drafter)
    from .training.data import chat_input_ids

    ids = chat_input_ids(tokenizer, args.prompt, target.device)
    sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    target.generate(ids, assistant_model=drafter, streamer=streamer, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.eos_token_id, **sampling)
    print(f"\n[mean acceptance length {drafter.last_stats.mean_acceptance_length:.2f}]", file=sys.stderr)
    return 0


def _check_pair_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.target is not None and args.drafter is None:
        parser.error("--drafter is required with --target (the shipped drafter belongs to the default target)")


# ----------------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """``dflash-hf bench``: once, or once per ``--dtype`` given, then a table of the dtypes side by side."""
    dtypes = list(dict.fromkeys(args.dtype or [None]))
    if len(dtypes) == 1:
        return _bench_one_dtype(argparse.Namespace(**{**vars(args), "dtype": dtypes[0]}))[0]
    from .fileio import atomic_write_text
    from .tools.bench import format_dtype_comparison

    codes, by_dtype = [], {}
    for dtype in dtypes:
        print(f"\n== target dtype {dtype} ==", flush=True)
        one = argparse.Namespace(**{**vars(args), "dtype": dtype, "out": str(Path(args.out) / dtype)})
        code, results = _bench_one_dtype(one)
        codes.append(code)
        if results is not None:
            by_dtype[dtype] = results
    if by_dtype:
        table = format_dtype_comparison(by_dtype)
        print("\n" + table)
        atomic_write_text(Path(args.out) / "dtypes.md", table + "\n")
    return max(codes)


def _bench_one_dtype(args: argparse.Namespace) -> tuple[int, dict | None]:
    """The bench at one target dtype: its exit code, and the methods' results (None for --suite, --batch-size)."""
    from .tools.bench import PLOT_EXTRA, can_plot
    from .tools.suites import bench_prompts, suite_prompts

    if not can_plot():  # said now, not after the run: the JSON is still written
        print(f"dflash-hf: matplotlib is not installed: the bench writes its JSON and skips the PNG "
              f"({PLOT_EXTRA} adds it).", file=sys.stderr)
    if args.suite:
        with _reported():  # every suite's prompts before any model loads: a missing package fails at once
            suites = {name: suite_prompts(name, args.num_prompts) for name in dict.fromkeys(args.suite)}
        return _bench_suites(args, suites), None
    with _reported():
        prompts = bench_prompts(args.prompts, limit=args.num_prompts)
    if args.batch_size and max(args.batch_size) > len(prompts):
        raise CommandError(f"--batch-size {max(args.batch_size)} needs at least that many prompts; "
                           f"{len(prompts)} were loaded (raise --num-prompts or give a longer --prompts file).")
    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype,
                                            args.calibration)
    _set_drafts_per_step(args, target, drafter)
    if args.batch_size:
        return _bench_batches(args, target, tokenizer, drafter, prompts), None
    return _bench_methods(args, target, tokenizer, drafter, prompts)


def _bench_suites(args: argparse.Namespace, suites: dict[str, list[str]]) -> int:
    from .tools.suites import format_suite_table, run_suites, write_suite_outputs

    target, tokenizer, drafter = _load_pair(args.target, args.drafter, args.dtype, args.drafter_dtype,
                                            args.calibration)
    _set_drafts_per_step(args, target, drafter)
    results = run_suites(target, tokenizer, drafter, suites, max_new_tokens=args.max_new_tokens)
    results["command"] = "dflash-hf " + " ".join(args.argv)
    print(format_suite_table(results))
    json_path, png_path = write_suite_outputs(results, args.out)
    print(_wrote(json_path, png_path, "bench_suites.png"))
    return 0 if results["lossless"] else 1


def _set_drafts_per_step(args: argparse.Namespace, target: Any, drafter: Any) -> None:
    """``--num-speculative-tokens``: a fixed number, or ``auto`` with this machine's verify costs (cached)."""
    wanted = args.num_speculative_tokens
    if wanted != "auto":
        most = drafter.config.block_size - 1
        if wanted > most:
            raise CommandError(f"--num-speculative-tokens {wanted} exceeds the drafts of one block of this "
                               f"drafter (block_size - 1 = {most}).")
        drafter.num_speculative_tokens = wanted
        return
    from .tools.calibration import Calibration

    calibration = getattr(args, "calibration", None) or Calibration.load()
    costs, cached = calibration.verify_costs(target, drafter)
    drafter.verify_costs, drafter.num_speculative_tokens = costs, "auto"
    shown = ", ".join(f"{rows} {1e3 * costs.at(rows):.1f} ms" for rows in (1, 4, 8, 16))
    when = "cached" if cached else "measured now"
    print(f"dflash-hf: drafts per step chosen by cost (a target forward over n positions here: {shown}; {when}; "
          "--num-speculative-tokens K fixes it)", file=sys.stderr)


def _check_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_pair_args(parser, args)
    if args.suite:
        for option, given in (("--prompts", args.prompts), ("--batch-size", args.batch_size),
                              ("--sampling-temperature", args.sampling_temperature)):
            if given is not None:
                parser.error(f"--suite names its own prompts and compares plain with DFlash; drop {option} "
                             "(run it as a separate dflash-hf bench)")


def _bench_methods(args: argparse.Namespace, target: Any, tokenizer: Any, drafter: Any,
                   prompts: list[str]) -> tuple[int, dict]:
    from .tools.bench import format_table, run_bench, sampling_acceptance, write_outputs

    results = run_bench(target, tokenizer, drafter, prompts, max_new_tokens=args.max_new_tokens,
                        batch_shape_control=True)
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
    print(_wrote(json_path, png_path, "bench.png"))
    return (0 if results["lossless"] else 1), results


def _bench_batches(args: argparse.Namespace, target: Any, tokenizer: Any, drafter: Any, prompts: list[str]) -> int:
    from .fileio import atomic_write_text
    from .tools.bench import can_plot, format_batch_table, plot_batch_results, run_batch_bench

    results = run_batch_bench(target, tokenizer, drafter, prompts, tuple(args.batch_size), args.max_new_tokens)
    results["command"] = "dflash-hf " + " ".join(args.argv)
    print(format_batch_table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_batch.json", json.dumps(results, indent=2) + "\n")
    png_path = out / "bench_batch.png" if can_plot() else None
    if png_path is not None:
        plot_batch_results(results, png_path)
    print(_wrote(out / "bench_batch.json", png_path, "bench_batch.png"))
    return 0 if results["lossless"] else 1


def _wrote(json_path: Path, png_path: Path | None, png_name: str) -> str:
    from .tools.bench import PLOT_EXTRA

    if png_path is not None:
        return f"wrote {json_path} and {png_path}"
    return f"wrote {json_path}; skipped {png_name}: matplotlib is not installed ({PLOT_EXTRA} adds it)"


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------
def _check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks no argument type can make alone (options that exclude each other), as TrainSpec makes them."""
    from .training.pipeline import TrainSpec

    try:
        TrainSpec.from_args(args)
    except ValueError as err:
        parser.error(str(err))


def cmd_train(args: argparse.Namespace) -> int:
    from .training.data import OpenAIServerError
    from .training.pipeline import TrainInputError, TrainSpec, run_pipeline

    spec = TrainSpec.from_args(args, command_line="dflash-hf " + " ".join(args.argv))
    try:
        run_pipeline(spec)
    except (TrainInputError, OpenAIServerError) as err:
        raise CommandError(str(err)) from err
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------
def _add_pair_args(parser: argparse.ArgumentParser, several_dtypes: bool = False) -> None:
    parser.add_argument("--target", metavar="ID_OR_DIR", type=model_source,
                        help="transformers model id or folder (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", metavar="ID_OR_DIR", type=model_source,
                        help="DFlash drafter id or folder (default: the shipped drafter; required with --target)")
    dtype_help = "target dtype (default: float32 for the default target, the checkpoint's for others)"
    if several_dtypes:
        parser.add_argument("--dtype", choices=DTYPES, nargs="+", metavar="DTYPE",
                            help=dtype_help[:-1] + "); several (e.g. float32 bfloat16) run the whole bench once per "
                                 "dtype, one after the other, each against plain decoding in that dtype, then print "
                                 "one table of them (DIR/<dtype>/ holds each one's files)")
    else:
        parser.add_argument("--dtype", choices=DTYPES, help=dtype_help)
    parser.add_argument("--drafter-dtype", choices=("auto",) + DTYPES, default="auto",
                        help="drafter dtype; changes speed and acceptance, never the output. auto (default): the "
                             "target's, or bfloat16 for a float32 CPU target where drafts measure clearly faster "
                             "in it on this machine")
    parser.add_argument("--num-speculative-tokens", type=drafts_per_step, metavar="K", default="auto",
                        help="drafts verified per step: auto (default) chooses each step's number by what "
                             "verifying it costs on this machine (measured once, cached) and how often each draft "
                             "is accepted, and decodes plainly where no number pays; K verifies K every step")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure this machine's one-time calibration (few-row plan, drafter dtype, verify "
                             "costs) again instead of reading its cache (or set DFLASH_HF_RECALIBRATE=1)")


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="stream an answer with the offline default pair and report the speedup",
                          description="Stream one answer with DFlash, then compare it with plain generate.",
                          formatter_class=HelpFormatter)
    _add_pair_args(demo)
    demo.add_argument("--prompt", metavar="TEXT", default=DEFAULT_PROMPT, help="the user message")
    demo.add_argument("--max-new-tokens", metavar="N", type=int_in_range(1), default=128,
                      help="tokens to generate at most")
    demo.add_argument("--repeats", metavar="N", type=int_in_range(1), default=3,
                      help="timed runs of each method, alternating")
    demo.set_defaults(func=cmd_demo, check=functools.partial(_check_pair_args, demo))


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate with a DFlash drafter, streaming",
                         description="Stream the answer to one prompt, generated with a DFlash drafter.",
                         formatter_class=HelpFormatter)
    _add_pair_args(gen)
    gen.add_argument("--prompt", metavar="TEXT", required=True, help="the user message")
    gen.add_argument("--max-new-tokens", metavar="N", type=int_in_range(1), default=256,
                     help="tokens to generate at most")
    gen.add_argument("--temperature", metavar="T", type=float_above(0, inclusive=True), default=0.0,
                     help="sampling temperature; 0 decodes greedily")
    gen.add_argument("--seed", metavar="N", type=int, help="seed torch's generator first, for a repeatable sample")
    gen.set_defaults(func=cmd_generate, check=functools.partial(_check_pair_args, gen))


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="plain vs DFlash vs prompt lookup, side by side; JSON + PNG",
                           description="Time plain generate, DFlash and prompt lookup on the same prompts, check "
                                       "every output against plain generate, and write bench.json and bench.png "
                                       "(the PNG needs matplotlib).",
                           formatter_class=HelpFormatter)
    _add_pair_args(bench, several_dtypes=True)
    bench.add_argument("--prompts", metavar="FILE_OR_NAME", type=bench_prompt_source,
                       help='JSONL prompt file (one {"prompt": ...} per line), a datasets id, or sharegpt, '
                            'chitchat or humaneval (their test split; the first human turn) (default: the shipped '
                            'held-out prompts)')
    bench.add_argument("--suite", nargs="+", choices=SUITE_NAMES, metavar="NAME",
                       help="instead: plain vs DFlash on each named suite, one table (bench_suites.json and .png): "
                            "bench-prompts (the shipped held-out prompts), sharegpt-test (a fixed sample of "
                            "ShareGPT's test split) or humaneval; --num-prompts caps each suite")
    bench.add_argument("--num-prompts", metavar="N", type=int_in_range(1),
                       help="use only the first N prompts (default: all)")
    bench.add_argument("--max-new-tokens", metavar="N", type=int_in_range(1), default=128,
                       help="tokens to generate per prompt")
    bench.add_argument("--out", metavar="DIR", type=output_folder, default="bench-results",
                       help="folder for the JSON and PNG")
    bench.add_argument("--batch-size", type=int_in_range(1), nargs="+", metavar="N",
                       help="instead: plain batched generate vs batched DFlash at these batch sizes (e.g. 1 2 4 8)")
    bench.add_argument("--sampling-temperature", metavar="T", type=float_above(0),
                       help="also measure the acceptance of strict vs ratio sampling at this temperature")
    bench.set_defaults(func=cmd_bench, check=functools.partial(_check_bench_args, bench))



def _add_train(sub: Any) -> None:
    train = sub.add_parser("train", help="regenerate data with the target, cache features, train a drafter",
                           description=TRAIN_DESCRIPTION, formatter_class=HelpFormatter)
    add_train_options(train)
    train.set_defaults(func=cmd_train, check=functools.partial(_check_train_args, train))


ADAPT_DESCRIPTION = ("Fine-tune a drafter on traffic recorded with dflash_hf.record_traffic (or imported logs), "
                     "with a replay share of its original data, and measure acceptance before and after, online, on "
                     "the newest held-out traffic and on the general bench suites. The adapted drafter is kept "
                     "(OUT/drafter) only if it stays lossless and its general acceptance falls by at most "
                     "--tolerance. Resumable: rerun the same command.")


def _add_adapt(sub: Any) -> None:
    from .tools.suites import SUITES

    adapt = sub.add_parser("adapt", help="adapt a drafter to recorded traffic; acceptance before and after",
                           description=ADAPT_DESCRIPTION, formatter_class=HelpFormatter)
    adapt.add_argument("--traffic", metavar="DIR", required=True, help="traffic folder (traffic-*.jsonl shards)")
    adapt.add_argument("--drafter", metavar="DIR", required=True, type=model_source, help="the drafter to adapt")
    adapt.add_argument("--out", metavar="DIR", required=True, type=output_folder, help="run folder")
    adapt.add_argument("--target", metavar="ID_OR_DIR", type=model_source,
                       help="the target the traffic was served by (default: the offline SmolLM2-135M-Instruct)")
    adapt.add_argument("--heldout-fraction", metavar="F", type=fraction, default=0.1,
                       help="the newest share of the traffic, held out for evaluation")
    adapt.add_argument("--replay-data", metavar="DIR",
                       help="the drafter's original training data: a dflash-hf train run folder or its data/")
    adapt.add_argument("--replay-fraction", metavar="F", type=fraction, default=0.3,
                       help="share of the training mix drawn from --replay-data (0 without it)")
    adapt.add_argument("--steps", metavar="N", type=int_in_range(1), default=300, help="fine-tuning steps")
    adapt.add_argument("--batch-size", metavar="N", type=int_in_range(1), default=4, help="sequences per step")
    adapt.add_argument("--num-anchors", metavar="N", type=int_in_range(1), default=16, help="blocks per sequence")
    adapt.add_argument("--lr", metavar="LR", type=float_above(0), default=2e-4, help="peak learning rate")
    adapt.add_argument("--distill", metavar="W", type=float_in_unit, default=0.0,
                       help="weight of distillation on the target's top-16 distribution (extracted with the features)")
    adapt.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="autocast the training forward")
    adapt.add_argument("--save-every", metavar="N", type=int_in_range(1), default=100, help="steps between checkpoints")
    adapt.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the replay draw, training, sampling")
    adapt.add_argument("--eval-suites", metavar="NAME", nargs="+", choices=SUITES, default=["bench-prompts"],
                       help="general suites measured before and after")
    adapt.add_argument("--eval-prompts", metavar="N", type=int_in_range(1), default=12, help="prompts per suite")
    adapt.add_argument("--eval-heldout", metavar="N", type=int_in_range(1),
                       help="held-out requests replayed (default: all)")
    adapt.add_argument("--max-new-tokens", metavar="N", type=int_in_range(1), default=128, help="per suite prompt")
    adapt.add_argument("--tolerance", metavar="F", type=float_above(0, inclusive=True), default=0.03,
                       help="largest relative fall of general acceptance that is accepted")
    adapt.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    from .training.adapt import AdaptInputError, AdaptRejected, AdaptSpec, run_adapt

    with _reported():
        spec = AdaptSpec(
            traffic=args.traffic, drafter=args.drafter, out=args.out, target=args.target,
            heldout_fraction=args.heldout_fraction, replay_data=args.replay_data,
            replay_fraction=args.replay_fraction if args.replay_data else 0.0, steps=args.steps,
            batch_size=args.batch_size, num_anchors=args.num_anchors, lr=args.lr, distill=args.distill,
            mixed_precision=args.mixed_precision, save_every=args.save_every, seed=args.seed,
            eval_suites=tuple(args.eval_suites), eval_prompts=args.eval_prompts, eval_heldout=args.eval_heldout,
            max_new_tokens=args.max_new_tokens, tolerance=args.tolerance,
            command_line="dflash-hf " + " ".join(args.argv),
        )
    if not args.replay_data:
        print("dflash-hf adapt: no --replay-data, so the drafter trains on the traffic alone (nothing replayed from "
              "its original data); the general suites will show what it forgets", file=sys.stderr)
    try:
        run_adapt(spec)
    except AdaptInputError as err:
        raise CommandError(str(err)) from err
    except AdaptRejected as err:
        raise CommandError(f"the adapted drafter was not kept: {err}") from err
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dflash-hf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _add_export_target(sub: Any) -> None:
    export = sub.add_parser("export-target", help="write the offline default target as a plain safetensors folder",
                            description="Copy the default target (SmolLM2-135M-Instruct, converted from its GGUF "
                                        "file) to OUT as a transformers folder that vLLM and SGLang serve: "
                                        "vllm serve OUT.", formatter_class=HelpFormatter)
    export.add_argument("out", metavar="OUT", type=output_folder, help="folder to write (must not exist or be empty)")
    export.set_defaults(func=cmd_export_target)


def cmd_export_target(args: argparse.Namespace) -> int:
    from .training.default_pair import export_default_target

    with _reported():
        out = export_default_target(args.out)
    print(f"wrote the default target to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    print(f"serve it: vllm serve {out}")
    return 0


def _add_campaign(sub: Any) -> None:
    campaign = sub.add_parser(
        "campaign", help="continue the drafter campaign from campaign/ within a time budget",
        description="One session of the drafter campaign on the default pair: regenerate the next slice of "
                    "conversations if asked (committed to campaign/data), extract features, train the best drafter "
                    "so far within the budget, measure it online against the drafter it started from, add a row to "
                    "campaign/ledger.jsonl (and ledger.png), and replace the shipped weights if it is better.",
        formatter_class=HelpFormatter)
    campaign.add_argument("--time-budget", metavar="DURATION", type=duration, default=7200.0,
                          help="wall time for the whole session, e.g. 120m or 2h")
    campaign.add_argument("--regenerate", metavar="N", type=int_in_range(0), default=0,
                          help="conversations of the train split to regenerate first (0: train on what is committed)")
    campaign.add_argument("--gen-batch-size", metavar="N", type=int_in_range(1), default=None,
                          help="conversations answered per batched generate call while regenerating "
                               "(default: the campaign's, measured fastest on a 2-core CPU)")
    campaign.add_argument("--source", choices=("sharegpt", "chitchat"), default="sharegpt",
                          help="the corpus whose train split the next slice comes from")
    campaign.add_argument("--campaign-dir", metavar="DIR", default="campaign",
                          help="the committed state: data shards, ledger and plot")
    campaign.add_argument("--work-dir", metavar="DIR", default="runs/campaign",
                          help="features and checkpoints (rebuilt from campaign/ on a new machine)")
    campaign.add_argument("--drafter", metavar="DIR", default=None,
                          help="the best drafter so far (default: campaign/drafter once a session has beaten the "
                               "shipped one, else the shipped one)")
    campaign.add_argument("--validation-prompts", metavar="N", type=int_in_range(1), default=16,
                          help="ShareGPT validation prompts the online acceptance is measured on")
    campaign.add_argument("--num-anchors", metavar="N", type=int_in_range(1), default=64,
                          help="blocks supervised per training sequence")
    campaign.add_argument("--lr", metavar="LR", type=float_above(0.0), default=2e-4, help="peak learning rate")
    campaign.add_argument("--recipe", metavar="NAME", default="warm-start", help="the ledger's name for this recipe")
    campaign.add_argument("--export", action="store_true",
                          help="also replace the shipped drafter's weights when the trained one is better (its model "
                               "card's numbers must then be re-measured); without it, the better drafter is kept in "
                               "campaign/drafter, where the next session starts")
    campaign.set_defaults(func=cmd_campaign)


def cmd_campaign(args: argparse.Namespace) -> int:
    from .training.campaign import CampaignSpec, run_campaign

    given = {"gen_batch_size": args.gen_batch_size} if args.gen_batch_size else {}
    spec = CampaignSpec(**given, campaign_dir=args.campaign_dir, work_dir=args.work_dir, drafter=args.drafter,
                        time_budget_s=args.time_budget, regenerate=args.regenerate, source=args.source,
                        validation_prompts=args.validation_prompts, num_anchors=args.num_anchors, lr=args.lr,
                        recipe=args.recipe, export=args.export)
    with _reported():
        run_campaign(spec)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-hf", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_train(sub)
    _add_adapt(sub)
    _add_export_target(sub)
    _add_campaign(sub)
    from .tools import hub

    hub.add_cli(sub, formatter_class=HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "check", None) is not None:
        args.check(args)
    try:
        with _machine_calibration(args):
            return int(args.func(args) or 0)
    except CommandError as err:
        print(f"dflash-hf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
