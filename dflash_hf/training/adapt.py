"""Adapt a drafter to recorded traffic: ``run_adapt(AdaptSpec(...))`` is ``dflash-hf adapt``.

A run folder is made in resumable stages:

1. ``adapt_data/``: the traffic's older part as training records, mixed with a replay share of the drafter's
   original training data, and the newest ``heldout_fraction`` held out (``traffic.build_adapt_data``);
2. ``features/``: the drafter's tapped target layers over the training records (one target pass);
3. ``checkpoints/``: fine-tuning, warm-started from the drafter; then ``adapted-drafter/``;
4. ``adapt_report.json`` (+ ``adapt_report.png``): acceptance of the base and the adapted drafter, online in the
   real decode loop, side by side on the same requests: the held-out traffic (replayed with its recorded
   settings) and the general suites of ``dflash-hf bench``.

The adapted drafter is kept as ``drafter/`` only when its general acceptance falls by at most ``tolerance``
(relative) and it stays lossless; otherwise it stays in ``adapted-drafter/``, the report says why, and
``AdaptRejected`` is raised. Its ``training.json`` cites the base drafter's recipe.

A rerun on the same folder resumes it, or judges the saved runs again with another ``tolerance``; any other option
than the tolerance (and ``save_every``) differing from ``adapt_options.json`` is refused, so that the folder's
recipe is always the one that made its data, weights and evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..fileio import atomic_write_text, can_plot, make_shareable, save_figure
from .data import chat_prompt_ids, read_jsonl
from .traffic import ADAPT_SUMMARY, build_adapt_data, iter_heldout_requests
from .trainer import (
    RECIPE_FILE,
    TEACHER_TOPK,
    WARM_START_RECIPE,
    FeatureDataset,
    TrainConfig,
    extract_features,
    latest_progress,
    train_drafter,
)

REPORT_JSON = "adapt_report.json"
REPORT_PNG = "adapt_report.png"
EVALUATION_JSON = "evaluation.json"  # the side-by-side runs, before the verdict
OPTIONS_JSON = "adapt_options.json"  # the options the folder's data, weights and evaluation were made with
# What a rerun may change: the verdict's tolerance (the saved runs are judged again), how often it saves, the line
# command.json records; the folder itself.
RERUN_FREE_FIELDS = ("out", "tolerance", "save_every", "command_line")
# The AdaptSpec fields the trainer reads (TrainConfig's names): checked against the checkpoints of a folder made
# before adapt_options.json existed.
TRAIN_FIELDS = ("steps", "batch_size", "num_anchors", "lr", "distill", "mixed_precision", "seed")
ADAPTED = "adapted-drafter"  # the fine-tuned weights, before the verdict
ACCEPTED = "drafter"  # the same, once within tolerance


class AdaptInputError(ValueError):
    """An input that fails once models load or the traffic is read (a drafter the target cannot take, an empty
    traffic folder, a run folder built from other inputs); ``dflash-hf adapt`` prints it as one error line."""




class AdaptRejected(RuntimeError):
    """The adapted drafter lost more general acceptance than the tolerance allows (or was not lossless)."""


@dataclass(frozen=True)
class AdaptSpec:
    """Everything an adaptation run is made from; one field per ``dflash-hf adapt`` option."""

    traffic: str | os.PathLike
    drafter: str | os.PathLike
    out: str | os.PathLike
    target: str | None = None
    heldout_fraction: float = 0.1
    replay_data: str | os.PathLike | None = None
    replay_fraction: float = 0.3
    steps: int = 300
    batch_size: int = 4
    num_anchors: int = 16
    lr: float = 2e-4
    distill: float = 0.0
    mixed_precision: str = "no"
    save_every: int = 100
    seed: int = 0
    eval_suites: tuple[str, ...] = ("bench-prompts",)
    eval_prompts: int = 12
    eval_heldout: int | None = None
    max_new_tokens: int = 128
    tolerance: float = 0.03
    command_line: str | None = None

    def __post_init__(self) -> None:
        for name in ("heldout_fraction", "replay_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        if not 0 < self.heldout_fraction:
            raise ValueError("heldout_fraction must be above 0: adaptation is judged on held-out traffic.")
        if self.replay_fraction > 0 and self.replay_data is None:
            raise ValueError(f"replay_fraction={self.replay_fraction} needs replay_data: the drafter's original "
                             "training data (a `dflash-hf train` run folder or its data/ folder); or set it to 0.")
        for name in ("steps", "batch_size", "num_anchors", "save_every", "eval_prompts", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.eval_heldout is not None and self.eval_heldout <= 0:
            raise ValueError(f"eval_heldout must be positive (or None for all), got {self.eval_heldout!r}.")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"distill must be in [0, 1], got {self.distill!r}.")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance!r}.")
        from .prompt_sources import SUITES

        unknown = [name for name in self.eval_suites if name not in SUITES]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; the suites are {', '.join(SUITES)}.")

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, num_anchors=self.num_anchors, lr=self.lr,
                           seed=self.seed, save_every=self.save_every, mixed_precision=self.mixed_precision,
                           distill=self.distill)


# ----------------------------------------------------------------------------------------------------------------
# Side-by-side online acceptance
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DrafterRun:
    """What one drafter did on a list of requests."""

    acceptance_lengths: list[int] = field(default_factory=list)  # per verify step, over every request
    seconds: float = 0.0
    new_tokens: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # generated ids per request

    @property
    def mean_acceptance_length(self) -> float:
        return sum(self.acceptance_lengths) / max(1, len(self.acceptance_lengths))

    def as_dict(self) -> dict:
        return {"mean_acceptance_length": round(self.mean_acceptance_length, 4), "verify_steps":
                len(self.acceptance_lengths), "new_tokens": self.new_tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": round(self.new_tokens / max(self.seconds, 1e-9), 3)}


def compare_drafters(target: Any, drafters: dict[str, Any], requests: list[tuple[list[int], dict]], seed: int = 0,
                     desc: str = "requests") -> dict[str, DrafterRun]:
    """Run every request with each drafter, in turn (the order flips every request, so that load on the machine
    hits both alike); a sampled request gets the same seed for each drafter."""
    runs = {name: DrafterRun() for name in drafters}
    device = next(target.parameters()).device
    order = list(drafters)
    for index, (prompt_ids, kwargs) in enumerate(tqdm(requests, desc=desc, unit="request")):
        ids = torch.tensor([prompt_ids], device=device)
        for name in order if index % 2 == 0 else order[::-1]:
            drafter = drafters[name]
            torch.manual_seed(seed + index)
            started = time.perf_counter()
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=drafter, **kwargs)
            runs[name].seconds += time.perf_counter() - started
            generated = out[0, ids.shape[1]:].tolist()
            runs[name].outputs.append(generated)
            runs[name].new_tokens += len(generated)
            runs[name].acceptance_lengths.extend(drafter.last_stats.acceptance_lengths)
    return runs


def _comparison(runs: dict[str, DrafterRun], requests: list[tuple[list[int], dict]]) -> dict:
    base, adapted = runs["base"], runs["adapted"]
    greedy = [i for i, (_, kwargs) in enumerate(requests) if not kwargs.get("do_sample")]
    same = sum(base.outputs[i] == adapted.outputs[i] for i in greedy)
    return {"requests": len(requests), "base": base.as_dict(), "adapted": adapted.as_dict(),
            "relative_change": round(adapted.mean_acceptance_length / max(base.mean_acceptance_length, 1e-9) - 1, 4),
            "greedy_requests": len(greedy), "greedy_identical": same}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def run_adapt(spec: AdaptSpec) -> dict:
    """Make (or resume) the run folder ``spec.out``; returns the report (also ``adapt_report.json``).
    Raises AdaptInputError for inputs that fail to load, AdaptRejected when the adapted drafter fails the verdict."""
    from .loading import input_errors_as, load_drafter, load_target

    out = Path(spec.out)
    check_rerun(spec)
    with input_errors_as(AdaptInputError):
        target, tokenizer = load_target(spec.target)
        base = load_drafter(str(spec.drafter), target, target.dtype, "--drafter")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "command.json", json.dumps({"command": spec.command_line or _as_command(spec)}))
        timings: dict[str, float] = {}
        started = time.perf_counter()
        data = build_adapt_data(spec.traffic, out / "adapt_data", heldout_fraction=spec.heldout_fraction,
                                replay_data_dir=_data_folder(spec.replay_data), replay_fraction=spec.replay_fraction,
                                seed=spec.seed)
        atomic_write_text(out / OPTIONS_JSON, json.dumps(run_options(spec), indent=2) + "\n")
    print(f"adapt data: {data['train_traffic']} traffic + {data['train_replay']} replay records to train on, "
          f"{data['heldout_records']} newest held out ({data['dropped_short']} too short to train on)")
    extract_features(target, out / "adapt_data" / "train", out / "features", base.config.target_layer_ids,
                     teacher_top_k=TEACHER_TOPK if spec.distill > 0 else 0, private=True)  # they hold prompt ids
    timings["data and features"] = time.perf_counter() - started

    started = time.perf_counter()
    adapted = _adapted_drafter(spec, target, base, out)
    timings["training"] = time.perf_counter() - started

    started = time.perf_counter()
    evaluation = out / EVALUATION_JSON
    if not evaluation.is_file():  # the costly part of a rerun (say with another --tolerance) is kept
        atomic_write_text(evaluation, json.dumps(_evaluate(spec, target, tokenizer, base, adapted, out), indent=2))
    timings["evaluation"] = time.perf_counter() - started
    report = json.loads(evaluation.read_text(encoding="utf-8"))
    report |= {"verdict": _verdict(spec, report["traffic_heldout"], report["general"]), "tolerance": spec.tolerance,
               "data": data, "wall_time_s": {stage: round(s, 1) for stage, s in timings.items()}}
    _write_recipe(spec, out, data, report)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    _plot_report(report, out / REPORT_PNG)
    print(format_report(report))
    if not report["verdict"]["accepted"]:
        raise AdaptRejected(report["verdict"]["reason"])
    _accept(out)
    print(f"adapted drafter saved to {out / ACCEPTED}")
    return report


def run_options(spec: AdaptSpec) -> dict:
    """What ``adapt_options.json`` records: every option but ``RERUN_FREE_FIELDS``, paths made absolute."""
    return {f.name: _comparable(getattr(spec, f.name)) for f in dataclasses.fields(spec)
            if f.name not in RERUN_FREE_FIELDS}


def check_rerun(spec: AdaptSpec) -> None:
    """Refuse to rerun ``spec`` on a folder made with other options (AdaptInputError naming each, with both values),
    before anything is loaded or written: the folder's data, adapted drafter and evaluation are reused as they are,
    so only the tolerance may change. A folder from before ``adapt_options.json`` is checked against its
    checkpoints' training settings."""
    out = Path(spec.out)
    recorded = out / OPTIONS_JSON
    if recorded.is_file():
        saved, ours = json.loads(recorded.read_text(encoding="utf-8")), run_options(spec)
        differences = {name: (saved.get(name), value) for name, value in ours.items() if saved.get(name) != value}
    else:
        differences = _checkpoint_differences(spec, out)
    if differences:
        said = ", ".join(f"--{name.replace('_', '-')} {_shown(saved)} (this run: {_shown(value)})"
                         for name, (saved, value) in differences.items())
        raise AdaptInputError(
            f"{out} was made with other options: {said}. Its data, adapted drafter and evaluation come from those "
            "and are reused; only --tolerance may change on a rerun (the saved runs are judged again). Rerun with "
            "the folder's values, or use another --out folder for these.")


def _checkpoint_differences(spec: AdaptSpec, out: Path) -> dict:
    found = latest_progress(out / "checkpoints")
    if found is None:
        return {}
    saved = found[1].get("config", {})
    return {name: (saved[name], getattr(spec, name)) for name in TRAIN_FIELDS
            if name in saved and saved[name] != getattr(spec, name)}


def _comparable(value: Any) -> Any:
    """A value as JSON holds it; a path that exists as its absolute form (one folder named two ways is one)."""
    if isinstance(value, tuple):
        return [_comparable(v) for v in value]
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.exists(value)):
        return str(Path(value).resolve()) if os.path.exists(value) else str(value)
    return value


def _shown(value: Any) -> str:
    return "not given" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _data_folder(path: str | os.PathLike | None) -> Path | None:
    """A run folder's ``data/``, or the folder itself when it holds the shards."""
    if path is None:
        return None
    path = Path(path)
    return path / "data" if (path / "data").is_dir() else path


def _adapted_drafter(spec: AdaptSpec, target: Any, base: Any, out: Path) -> Any:
    """The base drafter fine-tuned on ``features/`` (resumed from ``checkpoints/``); saved in ``adapted-drafter/``."""
    if (out / ADAPTED / "config.json").is_file() or (out / ACCEPTED / "config.json").is_file():
        from ..core.modeling_dflash import DFlashDraftModel

        folder = out / ACCEPTED if (out / ACCEPTED / "config.json").is_file() else out / ADAPTED
        return DFlashDraftModel.from_pretrained(folder, dtype=target.dtype).to(target.device).eval()
    drafter = copy.deepcopy(base).float()
    train_drafter(drafter, target, FeatureDataset(out / "features"), out / "checkpoints", spec.train_config())
    drafter = drafter.to(target.dtype).eval()
    drafter.config.name_or_path = out.name
    staging = out / f".{ADAPTED}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    drafter.save_pretrained(staging)
    make_shareable(staging)
    os.replace(staging, out / ADAPTED)
    return drafter


def _evaluate(spec: AdaptSpec, target: Any, tokenizer: Any, base: Any, adapted: Any, out: Path) -> dict:
    drafters = {"base": base, "adapted": adapted}
    heldout = list(iter_heldout_requests(out / "adapt_data"))[: spec.eval_heldout]
    recorded = _recorded_outputs(out / "adapt_data")[: len(heldout)]
    runs = compare_drafters(target, drafters, heldout, spec.seed, desc="held-out traffic")
    traffic = _comparison(runs, heldout)
    greedy = [i for i, (_, kwargs) in enumerate(heldout) if not kwargs.get("do_sample")]
    # Information, not a check: traffic served in another dtype or batched may legitimately differ from this run.
    traffic["greedy_as_recorded"] = sum(runs["adapted"].outputs[i] == recorded[i] for i in greedy)
    general = {}
    for name in spec.eval_suites:
        from .prompt_sources import suite_prompts

        requests = [(chat_prompt_ids(tokenizer, p), {"max_new_tokens": spec.max_new_tokens, "do_sample": False})
                    for p in suite_prompts(name, spec.eval_prompts)]
        general[name] = _comparison(compare_drafters(target, drafters, requests, spec.seed, desc=name), requests)
    return {"traffic_heldout": traffic, "general": general}


def _recorded_outputs(adapt_dir: Path) -> list[list[int]]:
    """What generate returned when each held-out record was served, in ``iter_heldout_requests``' order."""
    outputs = []
    for shard in sorted((adapt_dir / "heldout").glob("shard-*.jsonl")):
        for record in read_jsonl(shard):
            outputs.append(record["input_ids"][record["prompt_len"]:])
    return outputs


def _verdict(spec: AdaptSpec, traffic: dict, general: dict) -> dict:
    lossy = [name for name, row in {"traffic": traffic, **general}.items()
             if row["greedy_identical"] != row["greedy_requests"]]
    if lossy:
        return {"accepted": False, "reason": f"greedy outputs differ between drafters on {lossy}: a decoding bug, "
                "not a drafter problem; please report it."}
    drops = {name: -row["relative_change"] for name, row in general.items() if -row["relative_change"] > spec.tolerance}
    if drops:
        worst = ", ".join(f"{name} {100 * d:.1f}%" for name, d in drops.items())
        return {"accepted": False, "reason": f"general acceptance fell by more than the tolerance "
                f"({100 * spec.tolerance:.1f}%): {worst}. Raise --replay-fraction, lower --steps or --lr, or pass "
                "--tolerance to accept it."}
    return {"accepted": True, "reason": "lossless, and general acceptance within the tolerance"}


def _accept(out: Path) -> None:
    if (out / ADAPTED).is_dir():
        os.replace(out / ADAPTED, out / ACCEPTED)


def _write_recipe(spec: AdaptSpec, out: Path, data: dict, report: dict) -> None:
    """``training.json`` of the adapted drafter (beside its weights and in the run folder), citing the base's."""
    base_recipe = Path(spec.drafter) / RECIPE_FILE
    recipe = {
        "command": json.loads((out / "command.json").read_text())["command"],
        "adapted to recorded traffic": f"{data['traffic_records']} records, the newest {data['heldout_records']} held "
                                       "out for evaluation",
        "training records (traffic + replay of the original data)": f"{data['train_traffic']} + {data['train_replay']}",
        "steps × sequences per step × anchors per sequence": f"{spec.steps} × {spec.batch_size} × {spec.num_anchors}",
        "learning rate (AdamW, warmup + cosine)": spec.lr,
        "acceptance on held-out traffic (base → adapted)": _arrow(report["traffic_heldout"]),
        **{f"acceptance on {name} (base → adapted)": _arrow(row) for name, row in report["general"].items()},
    }
    if spec.distill > 0:
        recipe["distillation weight (against the target's top-16 distribution)"] = spec.distill
    if spec.mixed_precision != "no":
        recipe["mixed precision"] = spec.mixed_precision
    if base_recipe.is_file():
        recipe["adapted from a drafter trained with"] = json.loads(base_recipe.read_text(encoding="utf-8"))
        atomic_write_text(out / WARM_START_RECIPE, base_recipe.read_text(encoding="utf-8"))
    text = json.dumps(recipe, indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(out / RECIPE_FILE, text)
    for folder in (out / ADAPTED, out / ACCEPTED):
        if folder.is_dir():
            atomic_write_text(folder / RECIPE_FILE, text)


def _arrow(row: dict) -> str:
    return (f"{row['base']['mean_acceptance_length']:.3f} → {row['adapted']['mean_acceptance_length']:.3f} "
            f"({100 * row['relative_change']:+.1f}%, {row['requests']} requests)")


def format_report(report: dict) -> str:
    lines = [f"{'requests':<22}{'n':>5}{'base τ':>10}{'adapted τ':>11}{'change':>9}{'lossless':>10}"]
    rows = {"held-out traffic": report["traffic_heldout"], **report["general"]}
    for name, row in rows.items():
        lines.append(f"{name:<22}{row['requests']:>5}{row['base']['mean_acceptance_length']:>10.3f}"
                     f"{row['adapted']['mean_acceptance_length']:>11.3f}{100 * row['relative_change']:>+8.1f}%"
                     f"{row['greedy_identical']:>6}/{row['greedy_requests']}")
    verdict = report["verdict"]
    lines.append(("accepted: " if verdict["accepted"] else "REJECTED: ") + verdict["reason"])
    return "\n".join(lines)


def _plot_report(report: dict, path: Path) -> None:
    if not can_plot():
        return
    import matplotlib.pyplot as plt

    rows = {"held-out traffic": report["traffic_heldout"], **report["general"]}
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs = range(len(rows))
    for offset, name in ((-0.2, "base"), (0.2, "adapted")):
        heights = [r[name]["mean_acceptance_length"] for r in rows.values()]
        bars = ax.bar([x + offset for x in xs], heights, width=0.4, label=f"{name} drafter")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    top = max(r[name]["mean_acceptance_length"] for r in rows.values() for name in ("base", "adapted"))
    ax.set_ylim(1.0, 1.0 + (top - 1.0) * 1.35)  # one token per step is the floor: every step commits one
    ax.set_xticks(list(xs), list(rows))
    ax.set(ylabel="mean acceptance length (online)", title="Acceptance before and after adapting to traffic")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    save_figure(fig, path)


def _as_command(spec: AdaptSpec) -> str:
    words = ["dflash-hf", "adapt"]
    defaults = {f.name: f.default for f in dataclasses.fields(AdaptSpec)}
    for name, value in dataclasses.asdict(spec).items():
        if name == "command_line" or (name in defaults and value == defaults[name]
                                      and defaults[name] is not dataclasses.MISSING):
            continue
        option = "--" + name.replace("_", "-")
        words += [option, *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return " ".join(words)


__all__ = ["ADAPT_SUMMARY", "AdaptInputError", "AdaptRejected", "AdaptSpec", "DrafterRun", "OPTIONS_JSON", "check_rerun",
           "compare_drafters", "format_report", "run_adapt", "run_options"]
