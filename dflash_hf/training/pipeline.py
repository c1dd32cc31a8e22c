"""Training as a library: ``run_pipeline(TrainSpec(out=...))`` is ``dflash-hf train --out ...``.

A run folder is made in three resumable stages, each a function of its own:

1. prompts and the target's responses (``prepare_prompts``, ``regenerate_stage``): ``prompts.jsonl``, ``data/``;
2. the drafter's shape, which decides the target layers it taps (``drafter_stage``), and those layers' hidden
   states for every sequence (``feature_stage``): ``features/``;
3. training (``train_stage``): ``checkpoints/``, then ``drafter/`` and the recipe ``training.json``.

``command.json`` and ``timings.json`` (wall time per stage, summed over invocations) sit next to them. Rerun on the
same folder to resume: saved prompts, responses and features are kept, and training goes on from the newest
checkpoint. A rerun is checked first (``check_rerun``): options that shaped the folder's data (``data_options.json``)
or its checkpoints (saved with each) cannot change, except that ``num_prompts`` and ``steps`` may grow.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.modeling_dflash import DFlashDraftModel
from ..fileio import atomic_write_text, make_shareable
from .data import count_records, load_prompts, load_records, magpie_prompts, read_jsonl, regenerate
from .loading import input_errors_as, load_drafter, load_target
from .options import TRAINING_SOURCE_NAMES, train_parser
from .prompt_sources import training_conversations
from .trainer import (
    RECIPE_FILE,
    TEACHER_TOPK,
    WARM_START_RECIPE,
    FeatureDataset,
    ResumeMismatch,
    TrainConfig,
    draft_vocabulary,
    extract_features,
    latest_progress,
    resume_differences,
    summarize_run,
    train_drafter,
)

Prompt = str | dict  # a prompt string, or a conversation {"id", "turns"}


class TrainInputError(ValueError):
    """A run's input that fails once models load (a drafter the target cannot take, a prompt source that does not
    load); ``dflash-hf train`` prints it as one error line, without a traceback."""


def _inputs_checked() -> contextlib.AbstractContextManager[None]:
    return input_errors_as(TrainInputError)


# ----------------------------------------------------------------------------------------------------------------
# The spec: one field per `dflash-hf train` option
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSpec:
    """Everything a training run is made from: one field per ``dflash-hf train`` option, named after its dest and
    with the command's default (a test checks that they agree; a new option needs only its field here).

    A spec checks itself when made, with the command's own argument types, and raises ValueError with the
    command's messages: a bad value never reaches a model. Values are stored as the command would hold them
    (``~`` expanded, a named prompt source lower-cased)."""

    out: str | os.PathLike
    # data (stage 1)
    target: str | None = None
    prompts: str | None = None
    max_turns: int = 2
    num_prompts: int = 1000
    max_new_tokens: int = 192
    temperature: float = 0.0
    gen_batch_size: int = 32
    gen_dtype: str | None = None
    gen_drafter: str | None = None
    openai_base_url: str | None = None
    openai_model: str | None = None
    openai_concurrency: int = 16
    # drafter (stage 2)
    num_layers: int = 2
    block_size: int = 8
    num_taps: int = 5
    mask_token_id: int | None = None
    init_from_target: bool = False
    init_from: str | None = None
    draft_vocab_size: int | None = None
    # training (stage 3)
    steps: int = 1500
    batch_size: int = 4
    num_anchors: int = 16
    lr: float = 6e-4
    save_every: int = 200
    distill: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    no_resume: bool = False
    # Not an option: the line command.json records (None: the equivalent `dflash-hf train` command, as_command()).
    command_line: str | None = None

    def __post_init__(self) -> None:
        for name, action in _train_options().items():
            object.__setattr__(self, name, _checked_option(name, action, getattr(self, name)))
        _check_exclusive_options(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> TrainSpec:
        """The spec of parsed train options (``options.train_parser()``'s, or ``dflash-hf train``'s)."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **overrides})

    def as_command(self) -> str:
        """The ``dflash-hf train`` command line of this spec (options left at their default are left out)."""
        words = ["dflash-hf", "train"]
        for name, action in _train_options().items():
            value = getattr(self, name)
            if value == action.default and not action.required:
                continue
            option = action.option_strings[0]
            words += [option] if action.nargs == 0 else [option, shlex.quote(str(value))]
        return " ".join(words)


@functools.cache
def _train_options() -> dict[str, argparse.Action]:
    """The train options by dest, in the order the command lists them."""
    return {a.dest: a for a in train_parser()._actions if a.option_strings and a.dest != "help"}


def _checked_option(name: str, action: argparse.Action, value: Any) -> Any:
    """``value`` as the option's argument type returns it; ValueError with the type's message if it refuses it."""
    where = f"{name} ({action.option_strings[0]})"
    if value is None:
        if action.required or action.default is not None:
            raise ValueError(f"{where} is required" if action.required else
                             f"{where} must be given (the command's default is {action.default!r})")
        return None
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected True or False, got {value!r}")
        return value
    if action.type is None:
        parsed = value
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
    else:
        try:
            parsed = action.type(str(value))
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{where}: {err}") from None
        except ValueError:  # a builtin type (int): argparse's own wording
            raise ValueError(f"{where}: invalid {action.type.__name__} value: {value!r}") from None
        if isinstance(parsed, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            kind = "an integer" if isinstance(parsed, int) else "a number"
            raise ValueError(f"{where}: expected {kind}, got {value!r}")
    if action.choices is not None and parsed not in action.choices:
        raise ValueError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return parsed


def _check_exclusive_options(spec: TrainSpec) -> None:
    if spec.openai_model and not spec.openai_base_url:
        raise ValueError("--openai-model names the model of an --openai-base-url server; give --openai-base-url too")
    if spec.gen_drafter and spec.openai_base_url:
        raise ValueError("--gen-drafter speeds up regeneration by the local target; with --openai-base-url the "
                         "server writes the responses, so drop one of them")
    if spec.init_from and spec.init_from_target:
        raise ValueError("--init-from starts from a trained drafter and --init-from-target from the target's "
                         "layers; choose one")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def run_pipeline(spec: TrainSpec) -> Path:
    """Make (or resume) the run folder ``spec.out``; returns its ``drafter/`` folder, or with ``steps=0`` (data and
    features only; a later run with steps trains on them) the run folder. Raises TrainInputError for an input that
    fails once the target loads (a drafter the target cannot take fails before anything is written)."""
    out = Path(spec.out)
    check_rerun(spec)
    with _inputs_checked():
        target, tokenizer = load_target(spec.target)
    warm_drafter, gen_drafter = early_drafters(spec, target)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "command.json", json.dumps({"command": spec.command_line or spec.as_command()}))
    writer = _writer(target, spec.gen_dtype)
    prompts = prepare_prompts(spec, writer, tokenizer)
    atomic_write_text(out / DATA_OPTIONS_FILE, json.dumps(data_options(spec), indent=2) + "\n")
    timings: dict[str, float] = {}
    with _timed(timings, "data"):
        regenerate_stage(spec, target, writer, tokenizer, prompts, gen_drafter)
        writer.cache_clear()  # drop a gen_dtype copy before feature extraction and training
        del gen_drafter
        drafter = drafter_stage(spec, target, warm_drafter)
    with _timed(timings, "features"):
        feature_stage(spec, target, drafter)
    if spec.steps == 0:
        _add_timings(out, timings)
        print(f"data and features ready in {out} (--steps 0: no training)")
        return out
    with _timed(timings, "training"):
        train_stage(spec, target, drafter)
    return _save_drafter(spec, drafter, timings)


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - started


def new_drafter(spec: TrainSpec, target: Any) -> Any:
    """An untrained drafter of the spec's shape for ``target``, its initial weights drawn from ``spec.seed`` alone
    (the same whatever ran before in the process; the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return DFlashDraftModel.from_target(
            target, num_hidden_layers=spec.num_layers, block_size=spec.block_size, num_taps=spec.num_taps,
            mask_token_id=spec.mask_token_id, init_from_target=spec.init_from_target,
        )


def early_drafters(spec: TrainSpec, target: Any) -> tuple[Any | None, Any | None]:
    """``(init_from drafter, gen_drafter)``, loaded and checked against the target and against the run folder's
    cached features before stage 1, so that a drafter that cannot be used fails now and not after hours of data
    generation. Without init_from a new drafter is built once as a check and dropped (the one built after stage 1
    has the same weights: both are drawn from the seed)."""
    with _inputs_checked():
        gen_drafter = None
        if spec.gen_drafter:
            gen_drafter = load_drafter(spec.gen_drafter, target, target.dtype, "--gen-drafter")
        if spec.init_from:
            warm = load_drafter(spec.init_from, target, torch.float32, "--init-from").float()
            _check_cached_features(spec, warm.config.target_layer_ids)
            return warm, gen_drafter
        _check_cached_features(spec, new_drafter(spec, target).config.target_layer_ids)
    return None, gen_drafter


def _check_cached_features(spec: TrainSpec, layer_ids: list[int]) -> None:
    """Refuse a drafter that taps other target layers than the run folder's cached features."""
    meta = Path(spec.out) / "features" / "features.json"
    if not meta.is_file():
        return
    cached = json.loads(meta.read_text(encoding="utf-8"))["layer_ids"]
    if list(cached) != list(layer_ids):
        source = "the --init-from drafter" if spec.init_from else f"--num-taps {spec.num_taps}"
        raise TrainInputError(
            f"{meta.parent} holds the features of target layers {cached}, but this run's drafter taps {list(layer_ids)} "
            f"({source}); rerun with the drafter the folder was made with, or use another --out folder.")


def _writer(target: Any, gen_dtype: str | None) -> Callable[[], Any]:
    """The model that writes prompts and responses: the target, or its copy in ``gen_dtype``, made on first use
    (a resumed run with nothing left to write never holds two copies); ``cache_clear()`` drops the copy."""

    @functools.cache
    def writer() -> Any:
        if gen_dtype and getattr(torch, gen_dtype) != target.dtype:
            return copy.deepcopy(target).to(getattr(torch, gen_dtype))
        return target

    return writer


# A rerun --------------------------------------------------------------------------------------------------------
DATA_OPTIONS_FILE = "data_options.json"  # the options a run folder's prompts and responses were made with
# The options that decide which prompts a folder holds and what the target answered (so its features too); the
# others of stage 1 only say how the answers are written (--gen-dtype, --gen-batch-size, --gen-drafter, --openai-*)
# and may change, e.g. to grow a folder through a server. num_prompts may grow (not shrink): it is compared apart.
DATA_FIELDS = ("target", "prompts", "max_turns", "max_new_tokens", "temperature", "seed")
# The spec fields that shape the drafter's weights beside the trainer's own (TRAIN_CONFIG_FIELDS); saved with each
# checkpoint, and checked when one is resumed.
WEIGHT_FIELDS = ("num_layers", "block_size", "num_taps", "mask_token_id", "init_from_target", "init_from",
                 "draft_vocab_size")
# Drafter-shape keys (training.drafter_shape) named by the option that sets them.
SHAPE_OPTIONS = {"num_hidden_layers": "--num-layers", "block_size": "--block-size",
                 "target_layer_ids": "the tapped target layers (--num-taps)", "mask_token_id": "--mask-token-id",
                 "draft_vocab_size": "--draft-vocab-size"}


def check_rerun(spec: TrainSpec) -> None:
    """Refuse to run ``spec`` on a folder made with other options, before anything is loaded or written:
    TrainInputError naming each differing option with both values. Data options (``DATA_FIELDS``) are compared with
    ``data_options.json`` (num_prompts may grow); when training resumes a checkpoint, the trainer's options and
    ``WEIGHT_FIELDS`` are compared with those it was made with (steps may grow; --no-resume trains anew)."""
    with _inputs_checked():
        count_records(Path(spec.out) / "data")  # refuses shards this tool did not write, before anything is written
    _check_data_options(spec)
    _check_resumable(spec)


def data_options(spec: TrainSpec) -> dict:
    """What ``data_options.json`` records: ``DATA_FIELDS`` (paths made absolute) and num_prompts."""
    return {**{name: _comparable(getattr(spec, name)) for name in DATA_FIELDS}, "num_prompts": spec.num_prompts}


def seed_shapes_data(options: dict) -> bool:
    """Whether the seed chose the prompts or answers: Magpie prompts, a sampled named source, sampled answers."""
    return options.get("prompts") is None or options.get("prompts") in TRAINING_SOURCE_NAMES \
        or (options.get("temperature") or 0) > 0


def _comparable(value: Any) -> Any:
    """A path as its absolute form, so that one folder named two ways is one value; other values unchanged."""
    if isinstance(value, str) and value not in TRAINING_SOURCE_NAMES and os.path.exists(value):
        return str(Path(value).resolve())
    return value


def _check_data_options(spec: TrainSpec) -> None:
    path = Path(spec.out) / DATA_OPTIONS_FILE
    if not path.is_file():  # a new folder (or one written before the options were recorded)
        return
    saved, ours = json.loads(path.read_text(encoding="utf-8")), data_options(spec)
    differences = {name: (saved.get(name), ours[name]) for name in DATA_FIELDS if saved.get(name) != ours[name]}
    if "seed" in differences and not (seed_shapes_data(saved) or seed_shapes_data(ours)):
        del differences["seed"]  # prompts from a file answered greedily: the seed only reaches training
    if ours["num_prompts"] < saved.get("num_prompts", 0):
        differences["num_prompts"] = (saved["num_prompts"], ours["num_prompts"])
    if differences:
        said = ", ".join(f"{_option(name)} {_shown(a)} (this run: {_shown(b)})" for name, (a, b) in differences.items())
        raise TrainInputError(
            f"{spec.out} was made with other data options: {said}. Its prompts, responses and features come from "
            "those, so rerun with the folder's values (--num-prompts may grow, not shrink), or use another --out "
            "folder for these.")


def weight_recipe(spec: TrainSpec) -> dict:
    """The ``WEIGHT_FIELDS`` of a spec as saved with each checkpoint (paths made absolute)."""
    return {name: _comparable(getattr(spec, name)) for name in WEIGHT_FIELDS}


def _check_resumable(spec: TrainSpec) -> None:
    if spec.steps == 0 or spec.no_resume:
        return
    found = latest_progress(Path(spec.out) / "checkpoints")
    if found is None:
        return
    checkpoint, progress = found
    differences = resume_differences(progress, train_config(spec), recipe=weight_recipe(spec))
    if differences:
        raise TrainInputError(_resume_refusal(ResumeMismatch(checkpoint, differences, progress.get("drafter"))))


def _resume_refusal(mismatch: ResumeMismatch) -> str:
    """A trainer's ResumeMismatch in the words of the command: its option names, --no-resume, --out."""
    names = {**{name: _option(name) for name in (*TRAIN_CONFIG_FIELDS, *WEIGHT_FIELDS)}, **SHAPE_OPTIONS}
    return mismatch.explain(names, fresh_start="add --no-resume (its first checkpoint replaces these) or use another "
                                               "--out folder (--steps may grow without either)")


def _option(name: str) -> str:
    action = _train_options().get(name)
    return action.option_strings[0] if action is not None else name


def _shown(value: Any) -> str:
    return "not given" if value is None else str(value)


# Stage 1 --------------------------------------------------------------------------------------------------------
def prepare_prompts(spec: TrainSpec, writer: Callable[[], Any], tokenizer: Any) -> list[Prompt]:
    """The run's prompts, saved once to ``prompts.jsonl`` so that a resumed run answers the same ones. A run grown
    with a larger num_prompts keeps its prompts (and their responses and features); only the missing are made."""
    prompt_file = Path(spec.out) / "prompts.jsonl"
    prompts = _read_prompt_file(prompt_file) if prompt_file.exists() else []
    if len(prompts) >= spec.num_prompts:
        return prompts
    known = {_prompt_key(p) for p in prompts}
    fresh = _fresh_prompts(spec, writer, tokenizer, have=len(prompts))
    prompts += [p for p in fresh if _prompt_key(p) not in known][: spec.num_prompts - len(prompts)]
    atomic_write_text(prompt_file, "".join(json.dumps(_prompt_line(p)) + "\n" for p in prompts))
    return prompts


def _fresh_prompts(spec: TrainSpec, writer: Callable[[], Any], tokenizer: Any, have: int) -> list[Prompt]:
    """Prompts from the spec's source (those already saved among them), or ``num_prompts - have`` new Magpie
    prompts written by the target."""
    if spec.prompts in TRAINING_SOURCE_NAMES:
        with _inputs_checked():
            return training_conversations(spec.prompts, spec.num_prompts, seed=spec.seed, max_turns=spec.max_turns)
    if spec.prompts:
        with _inputs_checked():
            return load_prompts(spec.prompts, limit=spec.num_prompts)
    return magpie_prompts(writer(), tokenizer, spec.num_prompts - have, seed=spec.seed + have)


def regenerate_stage(spec: TrainSpec, target: Any, writer: Callable[[], Any], tokenizer: Any, prompts: list[Prompt],
                     gen_drafter: Any | None) -> None:
    """The target's responses to the prompts not answered yet, as shards in ``data/``."""
    if count_records(Path(spec.out) / "data") >= len(prompts):
        return
    if gen_drafter is not None:  # regenerate with batched DFlash: same responses, fewer target forwards
        gen_drafter = gen_drafter.to(writer().dtype)
    regenerate(target if spec.openai_base_url else writer(), tokenizer, prompts, Path(spec.out) / "data",
               max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, batch_size=spec.gen_batch_size,
               openai_base_url=spec.openai_base_url, openai_model=spec.openai_model, assistant_model=gen_drafter,
               openai_concurrency=spec.openai_concurrency)


def _read_prompt_file(path: Path) -> list[Prompt]:
    """A run's prompts.jsonl: a conversation where the line carries turns, else the prompt string."""
    return [{"id": r.get("id"), "turns": r["turns"]} if "turns" in r else r["prompt"] for r in read_jsonl(path)]


def _prompt_line(prompt: Prompt) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt": prompt["turns"][0], "id": prompt.get("id"), "turns": prompt["turns"]}


def _prompt_key(prompt: Prompt) -> str:
    """What makes two prompts the same one: a conversation's id, a prompt's text."""
    return prompt if isinstance(prompt, str) else f"id:{prompt.get('id')}"


# Stage 2 --------------------------------------------------------------------------------------------------------
def drafter_stage(spec: TrainSpec, target: Any, warm_drafter: Any | None) -> Any:
    """The drafter to train, whose shape decides which target layers are tapped: a new one, or the init_from drafter
    (its shape and taps win; its recipe, when it carries one, is kept as warm_start_training.json)."""
    drafter = new_drafter(spec, target).float() if warm_drafter is None else warm_drafter
    if warm_drafter is not None:
        earlier = Path(spec.init_from) / RECIPE_FILE
        if earlier.is_file():
            atomic_write_text(Path(spec.out) / WARM_START_RECIPE, earlier.read_text(encoding="utf-8"))
    if spec.draft_vocab_size is not None:
        drafter.config.draft_vocab = draft_vocabulary(load_records(Path(spec.out) / "data"), spec.draft_vocab_size,
                                                      target_eos_ids(target))
    return drafter


def target_eos_ids(target: Any) -> tuple[int, ...]:
    """The target's end-of-sequence ids: always in a draft vocabulary, so that drafts can end an answer."""
    eos = target.generation_config.eos_token_id
    return tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()


def feature_stage(spec: TrainSpec, target: Any, drafter: Any) -> None:
    """The drafter's tapped target layers, cached for every sequence of ``data/`` in ``features/``."""
    out = Path(spec.out)
    extract_features(target, out / "data", out / "features", drafter.config.target_layer_ids,
                     teacher_top_k=TEACHER_TOPK if spec.distill > 0 else 0)


# Stage 3 --------------------------------------------------------------------------------------------------------
def train_stage(spec: TrainSpec, target: Any, drafter: Any) -> None:
    """Train on ``features/``, checkpointing to ``checkpoints/`` and resuming from the newest unless no_resume."""
    out = Path(spec.out)
    try:
        train_drafter(drafter, target, FeatureDataset(out / "features"), out / "checkpoints", train_config(spec),
                      resume=not spec.no_resume, recipe=weight_recipe(spec))
    except ResumeMismatch as err:  # a checkpoint saved before its options were (check_rerun reads those)
        raise TrainInputError(_resume_refusal(err)) from err


# The spec fields the trainer reads, named as in TrainConfig (its other fields keep their defaults).
TRAIN_CONFIG_FIELDS = ("steps", "batch_size", "num_anchors", "lr", "seed", "save_every", "mixed_precision", "distill")


def train_config(spec: TrainSpec) -> TrainConfig:
    """The trainer's settings from the spec's TRAIN_CONFIG_FIELDS."""
    return TrainConfig(**{name: getattr(spec, name) for name in TRAIN_CONFIG_FIELDS})


def _save_drafter(spec: TrainSpec, drafter: Any, timings: dict[str, float]) -> Path:
    """``drafter/``, the summed timings and the recipe ``training.json`` (read from what the run wrote)."""
    out = Path(spec.out)
    drafter.config.name_or_path = out.name
    drafter.save_pretrained(out / "drafter")
    make_shareable(out / "drafter")  # safetensors writes model.safetensors 0600
    _add_timings(out, timings)
    atomic_write_text(out / RECIPE_FILE, json.dumps(summarize_run(out), indent=2, ensure_ascii=False) + "\n")
    print(f"drafter saved to {out / 'drafter'}; recipe in {out / RECIPE_FILE} (dflash-hf export --training-json)")
    return out / "drafter"


def _add_timings(run_dir: Path, timings: dict[str, float]) -> None:
    """Wall time per stage, summed over every invocation of a run folder (a resumed run adds what it redid)."""
    path = run_dir / "timings.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    totals = {**earlier, **{stage: earlier.get(stage, 0.0) + seconds for stage, seconds in timings.items()}}
    atomic_write_text(path, json.dumps(totals))


__all__ = [
    "DATA_FIELDS", "DATA_OPTIONS_FILE", "TRAIN_CONFIG_FIELDS", "TrainInputError", "TrainSpec", "WEIGHT_FIELDS",
    "check_rerun", "data_options", "drafter_stage", "early_drafters", "feature_stage", "new_drafter",
    "prepare_prompts", "regenerate_stage", "run_pipeline", "seed_shapes_data", "target_eos_ids", "train_config",
    "train_stage", "weight_recipe",
]
