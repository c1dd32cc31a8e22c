"""Loading a target and a drafter for the commands and the pipelines, checked against each other, and turning
input problems into one-line errors. Below the command line: ``cli``, ``pipeline`` and ``adapt`` all load through
here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def input_errors_as(error_type: type[Exception]) -> Iterator[None]:
    """Loading and checking inputs: their ValueError/OSError/ImportError become ``error_type`` (one line for the
    user, no traceback)."""
    try:
        yield
    except (ValueError, OSError, ImportError) as err:
        raise error_type(str(err)) from err


def is_dflash_config(config: dict) -> bool:
    """z-lab's and our configs nest ``dflash_config``; other DFlash formats say so in model_type/architectures."""
    return (
        isinstance(config.get("dflash_config"), dict)
        or config.get("model_type") == "dflash"
        or "DFlashDraftModel" in (config.get("architectures") or [])
    )


def config_dict(source: str) -> dict:
    """The raw config.json of a model id or folder, without building the model."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(source)
    return config


def require_drafter(source: str, option: str = "--drafter") -> None:
    """Refuse a plain model given where a DFlash drafter belongs, before anything loads."""
    config = config_dict(source)
    if not is_dflash_config(config):
        raise ValueError(
            f"{option} {source} is not a DFlash checkpoint: its config.json (model_type "
            f"{config.get('model_type')!r}, architectures {config.get('architectures')!r}) has no dflash_config. "
            f"{option} takes a DFlash drafter (written by `dflash-hf train` or `dflash-hf export`, or z-lab's); "
            "a plain model is a --target."
        )


def refuse_drafter_as_target(source: str) -> None:
    if is_dflash_config(config_dict(source)):
        raise ValueError(
            f"--target {source} is a DFlash drafter, not a target model; pass it as --drafter and give the model "
            "it drafts for as --target."
        )


def load_target(target_path: str | None, torch_dtype: Any = None) -> tuple[Any, Any]:
    """The offline default target, or a transformers id/folder, and its tokenizer."""
    if target_path is None:
        from .default_pair import load_default_target

        return load_default_target(torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refuse_drafter_as_target(target_path)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch_dtype or "auto", device_map="auto").eval()
    return target, tokenizer


def load_drafter(source: str, target: Any, dtype: Any, option: str = "--drafter") -> Any:
    """A DFlash drafter on the target's device, checked against the target (a mismatch fails here, not later)."""
    from ..core.modeling_dflash import DFlashDraftModel
    from ..core.pair_dflash import validate_pair

    require_drafter(source, option)
    drafter = DFlashDraftModel.from_pretrained(source, dtype=dtype).to(target.device).eval()
    validate_pair(target, drafter)
    return drafter


__all__ = ["config_dict", "input_errors_as", "is_dflash_config", "load_drafter", "load_target",
           "refuse_drafter_as_target", "require_drafter"]
