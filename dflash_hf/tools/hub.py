"""Hub export and publishing: a trained drafter becomes a folder that is ready to publish, then a Hub repository.

``export_drafter`` writes the folder atomically: the weights (safetensors only), config.json with ``auto_map``,
the portable core .py files and a model card whose results come only from a ``dflash-hf bench`` JSON.
``publish`` checks that folder and uploads it. ``check_serving_contract`` checks what vLLM's and SGLang's DFlash
loaders read from a draft checkpoint. Export and publish both refuse a folder that would not serve there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from ..fileio import make_shareable, staging_dir

CORE_DIR = Path(__file__).resolve().parents[1] / "core"
CARD_TEMPLATE = "drafter_card.md.jinja"
SHIPPED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHIPPED_MODEL_NAME = "dflash-hf/SmolLM2-135M-Instruct-DFlash"
CARD_TAGS = ["dflash", "speculative-decoding", "block-diffusion", "draft-model"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
BENCH_KEYS = (
    "command", "target", "drafter", "device", "dtype", "max_new_tokens", "num_prompts",
    "transformers_version", "torch_version", "lossless", "methods",
)
METHOD_ORDER = ("plain", "dflash", "dflash_lookup", "prompt_lookup", "transformers_dflash")


class HubPublishError(RuntimeError):
    """The Hub refused or failed an upload; the message never contains the token."""


# ----------------------------------------------------------------------------------------------------------------
# Serving contract (vLLM, SGLang)
# ----------------------------------------------------------------------------------------------------------------
# What the two servers read from a DFlash draft checkpoint. These upstream files were checked (read, not copied):
#   vllm-project/vllm  vllm/model_executor/models/qwen3_dflash.py  (weights: no "model." prefix, the loader adds
#                      one; fc / hidden_norm / norm / layers.*; fc input = len(taps) * target_hidden_size;
#                      no mask_hidden tensor)
#   vllm-project/vllm  vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py  (taps = dflash_config.target_layer_ids + 1,
#                      but an eagle_aux_hidden_state_layer_ids key takes precedence)
#   vllm-project/vllm  vllm/config/speculative.py, model_executor/models/registry.py
#                      (method "dflash"; architecture "DFlashDraftModel" -> DFlashQwen3ForCausalLM; config parsed
#                      by transformers' AutoConfig, hence model_type "qwen3")
#   sgl-project/sglang python/sglang/srt/models/dflash.py  (EntryClass DFlashDraftModel; fc sized len(taps) *
#                      hidden_size, i.e. target_hidden_size must equal hidden_size; silu only; unknown tensor names
#                      are SKIPPED silently, so a renamed tensor loads as garbage instead of failing)
#   sgl-project/sglang python/sglang/srt/speculative/dflash_utils.py  (block_size: dflash_config wins over top level;
#                      target_layer_ids < num_target_layers, which falls back to the DRAFT's layer count if absent;
#                      mask_token_id a non-negative int, else a "<|MASK|>" token is looked up in the tokenizer)
_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_serving_contract(folder: str | Path) -> list[str]:
    """Problems that would stop vLLM or SGLang from loading ``folder`` as a DFlash drafter ([] = none)."""
    folder = Path(folder)
    config, problems = _read_config(folder)
    if config is None:
        return problems
    problems += _config_contract_problems(config)
    tensors, weight_problems = _read_tensor_shapes(folder)
    problems += weight_problems
    if tensors is not None and not problems:
        # Expected shapes come from the config, so only compare them once the config itself is sound.
        problems += _tensor_contract_problems(config, tensors)
    return problems


def _read_config(folder: Path) -> tuple[dict | None, list[str]]:
    path = folder / "config.json"
    if not path.is_file():
        return None, [f"{path} is missing."]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, [f"{path} is not valid JSON: {err}"]
    if not isinstance(config, dict):
        return None, [f"{path} must hold a JSON object."]
    return config, []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_contract_problems(config: dict) -> list[str]:
    problems: list[str] = []
    archs = config.get("architectures")
    if not (isinstance(archs, list) and archs and archs[0] == "DFlashDraftModel"):
        problems.append(
            f"architectures must be [\"DFlashDraftModel\"] (vLLM's registry and SGLang's EntryClass select the "
            f"drafter by architectures[0]); got {archs!r}."
        )
    if config.get("model_type") != "qwen3":
        problems.append(
            f"model_type must be \"qwen3\" (vLLM and SGLang parse the draft config with transformers' AutoConfig, "
            f"as z-lab's drafters do); got {config.get('model_type')!r}."
        )
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not (_is_int(config.get(key)) and config[key] > 0):
            problems.append(f"{key} must be a positive integer; got {config.get(key)!r}.")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(
            f"hidden_act must be \"silu\" (SGLang's DFlash MLP supports nothing else); got {config['hidden_act']!r}."
        )
    target_hidden = config.get("target_hidden_size")
    if target_hidden is not None and target_hidden != config.get("hidden_size"):
        problems.append(
            f"target_hidden_size ({target_hidden}) differs from hidden_size ({config.get('hidden_size')}): SGLang "
            "sizes fc as len(target_layer_ids) * hidden_size and would fail to load fc.weight."
        )
    problems += _dflash_config_problems(config)
    problems += _layer_type_problems(config)
    return problems


def _dflash_config_problems(config: dict) -> list[str]:
    nested = config.get("dflash_config")
    if not isinstance(nested, dict):
        return [
            "dflash_config is missing or not an object: vLLM and SGLang read the drafter's target_layer_ids and "
            "mask_token_id from config.json's dflash_config (z-lab format)."
        ]
    problems: list[str] = []
    taps = nested.get("target_layer_ids")
    taps_ok = isinstance(taps, list) and bool(taps) and all(_is_int(t) and t >= 0 for t in taps)
    if not taps_ok:
        problems.append(f"dflash_config.target_layer_ids must be a non-empty list of layer indices >= 0; got {taps!r}.")
    num_target_layers = nested.get("num_target_layers", config.get("num_target_layers"))
    if not (_is_int(num_target_layers) and num_target_layers > 0):
        problems.append(
            f"num_target_layers must be a positive integer (without it SGLang checks the taps against the drafter's "
            f"own layer count); got {num_target_layers!r}."
        )
    elif taps_ok and max(taps) >= num_target_layers:
        problems.append(f"dflash_config.target_layer_ids {taps} reach beyond num_target_layers={num_target_layers}.")
    mask = nested.get("mask_token_id")
    if not (_is_int(mask) and mask >= 0):
        problems.append(
            f"dflash_config.mask_token_id must be an integer >= 0 (without it SGLang looks up a '<|MASK|>' token in "
            f"the tokenizer); got {mask!r}."
        )
    elif _is_int(config.get("vocab_size")) and mask >= config["vocab_size"]:
        problems.append(
            f"dflash_config.mask_token_id {mask} is outside the vocabulary (vocab_size={config['vocab_size']})."
        )
    problems += _block_size_problems(config, nested)
    aux = config.get("eagle_aux_hidden_state_layer_ids")
    if aux is not None and taps_ok and list(aux) != [t + 1 for t in taps]:
        problems.append(
            f"eagle_aux_hidden_state_layer_ids {aux} overrides dflash_config.target_layer_ids in vLLM and disagrees "
            f"with it (expected {[t + 1 for t in taps]}, vLLM's 'before layer i+1' numbering); remove it."
        )
    return problems


def _block_size_problems(config: dict, nested: dict) -> list[str]:
    top, inner = config.get("block_size"), nested.get("block_size")
    if top is None and inner is None:
        return ["block_size is missing (top level, or dflash_config.block_size)."]
    problems = [
        f"{where} must be an integer >= 2; got {value!r}."
        for where, value in (("block_size", top), ("dflash_config.block_size", inner))
        if value is not None and not (_is_int(value) and value >= 2)
    ]
    if top is not None and inner is not None and top != inner:
        problems.append(f"block_size ({top}) and dflash_config.block_size ({inner}) disagree; SGLang uses the latter.")
    return problems


def _layer_type_problems(config: dict) -> list[str]:
    layer_types = config.get("layer_types")
    if layer_types is None:
        return []
    num_layers = config.get("num_hidden_layers")
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        return [f"layer_types must list one entry per drafter layer ({num_layers}); got {layer_types!r}."]
    problems = [f"layer_types entry {t!r} is not one of {_LAYER_TYPES}." for t in layer_types if t not in _LAYER_TYPES]
    if "sliding_attention" in layer_types and not _is_int(config.get("sliding_window")):
        problems.append("layer_types has sliding_attention layers but sliding_window is not an integer.")
    return problems


def _read_tensor_shapes(folder: Path) -> tuple[dict[str, list[int]] | None, list[str]]:
    """Tensor name -> shape from the safetensors headers (nothing is loaded into memory)."""
    from safetensors import safe_open

    files, problems = _weight_files(folder)
    if problems:
        return None, problems
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = list(handle.get_slice(name).get_shape())
        except Exception as err:  # a truncated or foreign file: report it, do not crash the check
            problems.append(f"{path.name} is not a readable safetensors file: {err}")
    return (None if problems else shapes), problems


def _weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single], []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [], [f"{index.name} is unreadable: {err}"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        return files, [f"{index.name} names missing shard(s) {missing}."] if missing else []
    return [], [f"no safetensors weights in {folder} (model.safetensors or model.safetensors.index.json)."]


def _expected_shapes(config: dict) -> dict[str, list[int]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    taps = len(config["dflash_config"]["target_layer_ids"])
    target_hidden = config.get("target_hidden_size") or hidden
    shapes = {"fc.weight": [hidden, taps * target_hidden], "hidden_norm.weight": [hidden], "norm.weight": [hidden]}
    projections = {
        "self_attn.q_proj": [heads * head_dim, hidden],
        "self_attn.k_proj": [kv_heads * head_dim, hidden],
        "self_attn.v_proj": [kv_heads * head_dim, hidden],
        "self_attn.o_proj": [hidden, heads * head_dim],
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"layers.{i}."
        for name, shape in projections.items():
            shapes[f"{prefix}{name}.weight"] = shape
            if config.get("attention_bias"):
                shapes[f"{prefix}{name}.bias"] = [shape[0]]
        shapes[f"{prefix}self_attn.q_norm.weight"] = [head_dim]
        shapes[f"{prefix}self_attn.k_norm.weight"] = [head_dim]
        shapes[f"{prefix}mlp.gate_proj.weight"] = [inter, hidden]
        shapes[f"{prefix}mlp.up_proj.weight"] = [inter, hidden]
        shapes[f"{prefix}mlp.down_proj.weight"] = [hidden, inter]
        shapes[f"{prefix}input_layernorm.weight"] = [hidden]
        shapes[f"{prefix}post_attention_layernorm.weight"] = [hidden]
    return shapes


def _tensor_contract_problems(config: dict, tensors: dict[str, list[int]]) -> list[str]:
    expected = _expected_shapes(config)
    problems = [
        f"tensor {name} is missing (vLLM fails to load; SGLang silently leaves that weight uninitialised)."
        for name in sorted(set(expected) - set(tensors))
    ]
    problems += [
        f"unexpected tensor {name}: the format has exactly layers.*, fc, hidden_norm and norm, without a 'model.' "
        "prefix and without embedding or LM head (vLLM rejects or repurposes unknown names, SGLang skips them)."
        for name in sorted(set(tensors) - set(expected))
    ]
    problems += [
        f"tensor {name} has shape {tensors[name]}, the config implies {shape}."
        for name, shape in sorted(expected.items())
        if name in tensors and tensors[name] != shape
    ]
    return problems


# ----------------------------------------------------------------------------------------------------------------
# What a publishable folder holds
# ----------------------------------------------------------------------------------------------------------------
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.M)
_PACKAGE_IMPORT = re.compile(r"^\s*(?:import|from)\s+dflash_hf\b", re.M)


def hub_folder_problems(folder: str | Path) -> list[str]:
    """Everything wrong with ``folder`` as a Hub drafter repository ([] = ready to publish).

    Covers the files (config, safetensors, README, no pickles), the remote code that ``trust_remote_code=True``
    loads, and the vLLM/SGLang serving contract.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder."]
    problems = [
        f"{name} is a pickle-format file; publish safetensors only (pickles can run code when loaded)."
        for name in _visible_files(folder)
        if name.lower().endswith(PICKLE_SUFFIXES)
    ]
    if not (folder / "README.md").is_file():
        problems.append("README.md (the model card) is missing; `dflash-hf export` writes one.")
    problems += _remote_code_problems(folder)
    problems += check_serving_contract(folder)
    return problems


def _remote_code_problems(folder: Path) -> list[str]:
    config, problems = _read_config(folder)
    if config is None:
        return []  # check_serving_contract reports the missing config
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not {"AutoConfig", "AutoModel"} <= set(auto_map):
        return [
            f"config.json auto_map must name AutoConfig and AutoModel (trust_remote_code loading); got {auto_map!r}."
        ]
    for key, target in auto_map.items():
        module = str(target).split("--")[-1].rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            problems.append(f"auto_map[{key!r}] = {target!r} but {module}.py is not in the folder.")
    for source in sorted(folder.glob("*.py")):
        text = source.read_text(encoding="utf-8")
        problems += [
            f"{source.name} imports .{name} but {name}.py is not in the folder."
            for name in _RELATIVE_IMPORT.findall(text)
            if not (folder / f"{name}.py").is_file()
        ]
        if _PACKAGE_IMPORT.search(text):
            problems.append(f"{source.name} imports dflash_hf outright; Hub code must run with transformers alone.")
    return problems


# What `export_drafter` writes: the weights (one file or shards and their index), configs, the model card, the
# recipe and the portable core modules, all at the top of the folder. Anything else in the folder (a __pycache__
# that pip or Python left next to the .py files, a user's notes) is not uploaded.
_EXPORTED_FILE = re.compile(
    r"(config|generation_config)\.json|README\.md|training\.json"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|[A-Za-z_]\w*\.py"
)


def _publishable_files(folder: Path) -> list[str]:
    """Names of the files an upload sends: those of them `export_drafter` writes (see ``_EXPORTED_FILE``)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and _EXPORTED_FILE.fullmatch(p.name))


def _visible_files(folder: Path) -> list[str]:
    """Relative paths of every file in ``folder`` but hidden ones and Python's bytecode caches."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        hidden = any(part.startswith(".") or part == "__pycache__" for part in rel.parts)
        if path.is_file() and not hidden:
            files.append(rel.as_posix())
    return files


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def export_drafter(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    base_model: str,
    bench_json: str | Path | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
    training_summary: dict | None = None,
    num_speculative_tokens: int | None = None,
) -> Path:
    """Write a ready-to-publish drafter folder at ``out_dir`` from a drafter ``checkpoint`` folder.

    ``checkpoint`` is a folder in our (or z-lab's) checkpoint format. ``out_dir`` appears complete or not at all:
    the folder is built next to it and swapped in only once it passes ``hub_folder_problems``. An existing
    ``out_dir`` is replaced only when it is empty or holds an earlier export. ``model_name`` may be the target Hub
    id ("org/name"), which then appears in the card's usage snippets. ``num_speculative_tokens`` stores a default
    for the drafts verified per step in the config (e.g. when drafts past the K-th are almost never accepted).
    ``training_summary`` defaults to the ``training.json`` already in ``checkpoint`` (an earlier export), so a
    re-export keeps the recipe. Returns the resolved ``out_dir``.
    """
    from ..core.pair_dflash import max_drafts_per_step

    checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir).resolve()
    if not base_model or not isinstance(base_model, str):
        raise ValueError("base_model must name the target model (a Hub id such as 'Qwen/Qwen3-8B').")
    if out_dir == checkpoint or out_dir in checkpoint.parents:
        raise ValueError(f"out_dir {out_dir} would replace the checkpoint {checkpoint}; choose another folder.")
    _check_replaceable(out_dir)
    bench = _load_bench(Path(bench_json)) if bench_json is not None else None
    if training_summary is None:
        training_summary = _checkpoint_recipe(checkpoint)
    drafter = _load_checkpoint(checkpoint)
    if num_speculative_tokens is not None:
        _set_drafts_per_step(drafter, num_speculative_tokens)
    if bench is not None and bench.get("block_size") not in (None, drafter.config.block_size):
        raise ValueError(
            f"{bench_json} was measured with block size {bench['block_size']}, this drafter has "
            f"{drafter.config.block_size}: the results belong to another drafter."
        )
    drafts = max_drafts_per_step(drafter)
    if bench is not None and bench.get("drafts_per_step") == "auto":
        raise ValueError(
            f"{bench_json} was measured with the drafts of each step chosen by cost on the bench machine; a card's "
            f"numbers must come from the drafts the card states: re-run the bench with --num-speculative-tokens "
            f"{drafts} (or the number to store, passed here too)."
        )
    if bench is not None and bench.get("drafts_per_step") not in (None, drafts):
        raise ValueError(
            f"{bench_json} was measured verifying {bench['drafts_per_step']} drafts per step, the exported drafter "
            f"verifies {drafts}: pass --num-speculative-tokens {bench['drafts_per_step']} or re-run the bench."
        )
    staging = staging_dir(out_dir.parent, prefix=f".{out_dir.name}.export-")
    try:
        _write_folder(drafter, staging, base_model=base_model, bench=bench, license=license,
                      model_name=model_name or out_dir.name, training_summary=training_summary)
        problems = hub_folder_problems(staging)
        if problems:
            raise ValueError("the exported folder is not publishable:\n  - " + "\n  - ".join(problems))
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _checkpoint_recipe(checkpoint: Path) -> dict | None:
    """The training.json an exported folder carries, or None when ``checkpoint`` has none."""
    path = checkpoint / "training.json"
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the recipe {path}: {err}; fix it, or pass --training-json.") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a JSON object (the training.json of `dflash-hf train`).")
    return recipe


def _set_drafts_per_step(drafter: Any, count: int) -> None:
    most = drafter.config.block_size - 1
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most:
        raise ValueError(f"--num-speculative-tokens must be from 1 to block_size - 1 = {most}, got {count!r}.")
    drafter.config.num_speculative_tokens = count
    drafter.num_speculative_tokens = count


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder.")
    if not any(out_dir.iterdir()):
        return
    config, _ = _read_config(out_dir)
    if config is None or "dflash_config" not in config or not (out_dir / "README.md").is_file():
        raise FileExistsError(
            f"{out_dir} exists and does not look like an exported drafter (config.json with dflash_config and a "
            "README.md); refusing to replace it. Choose another out_dir or remove it yourself."
        )


def _load_checkpoint(checkpoint: Path) -> Any:
    from ..core.modeling_dflash import DFlashDraftModel

    if not (checkpoint / "config.json").is_file():
        raise ValueError(
            f"{checkpoint} is not a drafter checkpoint folder: it needs config.json and model.safetensors (the "
            "format `dflash-hf train` and z-lab's DFlash repositories use)."
        )
    if not _weight_files(checkpoint)[0]:
        pickles = sorted(p.name for p in checkpoint.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        hint = f" It holds pickle-format weights {pickles}, which dflash-hf never loads." if pickles else ""
        raise ValueError(f"{checkpoint} has no safetensors weights (model.safetensors).{hint}")
    try:  # strict: missing, unexpected or mismatched tensors raise (DFlashDraftModel.from_pretrained)
        drafter = DFlashDraftModel.from_pretrained(checkpoint, dtype="auto", use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ValueError(f"{checkpoint} is not a loadable DFlash drafter checkpoint: {err}") from err
    return drafter.eval()


def _write_folder(drafter: Any, folder: Path, *, base_model: str, bench: dict | None, license: str,
                  model_name: str, training_summary: dict | None) -> None:
    # A z-lab config carries its own auto_map ("dflash.DFlashDraftModel"); save_pretrained only adds entries, so
    # stale ones would point at files this folder does not hold.
    drafter.config.auto_map = {}
    drafter.save_pretrained(folder)
    write_core_files(folder)  # the whole core, whichever modules save_pretrained followed from the drafter's class
    card = render_model_card(drafter, base_model=base_model, bench=bench, license=license,
                             model_name=model_name, training_summary=training_summary)
    (folder / "README.md").write_text(card, encoding="utf-8")
    if training_summary:  # the recipe travels with the weights, so a run warm-started from them can cite it
        recipe = json.dumps(training_summary, indent=2, ensure_ascii=False) + "\n"
        (folder / "training.json").write_text(recipe, encoding="utf-8")
    make_shareable(folder)  # safetensors writes model.safetensors 0600


def core_files() -> list[Path]:
    """The modules every exported drafter carries: all of ``dflash_hf/core/`` except its package docstring."""
    return sorted(p for p in CORE_DIR.glob("*.py") if p.name != "__init__.py")


def write_core_files(folder: Path) -> None:
    """Copy the core into ``folder``, replacing any older copies there (``folder`` is a staging folder)."""
    for source in core_files():
        shutil.copyfile(source, folder / source.name)


def export_shipped_drafter(out_dir: str | os.PathLike | None = None) -> Path:
    """Re-export the shipped default drafter (``hub_upload/SmolLM2-135M-Instruct-DFlash``, in place by default)
    from its own weights, bench and recipe: how that folder's code and card are generated from the core."""
    from ..training.default_pair import default_drafter_dir

    shipped = default_drafter_dir()
    bench = shipped.parent / f"{shipped.name}.bench.json"
    recipe = shipped.parent / f"{shipped.name}.training.json"
    target = Path(out_dir) if out_dir is not None else shipped.parent / f".{shipped.name}.refresh-{uuid.uuid4().hex[:8]}"
    export_drafter(shipped, target, base_model=SHIPPED_BASE_MODEL, bench_json=bench, model_name=SHIPPED_MODEL_NAME,
                   training_summary=json.loads(recipe.read_text()) if recipe.exists() else None)
    if out_dir is not None:
        return target.resolve()
    _swap_into_place(target, shipped)  # export refuses to write over its own checkpoint, so build beside it
    return shipped


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` be ``out_dir``; an existing ``out_dir`` is removed only after the swap succeeded."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    previous = out_dir.parent / f".{out_dir.name}.previous-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, previous)  # a directory cannot be renamed onto a non-empty one
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(previous, out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------
def render_model_card(
    drafter: Any,
    *,
    base_model: str,
    bench: dict | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
    training_summary: dict | None = None,
) -> str:
    """The README.md of a drafter repository: YAML metadata plus a card whose numbers come only from ``bench``."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__
    from ..core.pair_dflash import max_drafts_per_step

    config = drafter.config
    name = model_name or "DFlash drafter"
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        license=license,
        model_name=name,
    )
    variables = dict(
        card_data=card_data.to_yaml(),
        model_name=name,
        repo_id=name if "/" in name else f"<your-org>/{name}",
        base_model=base_model,
        block_size=config.block_size,
        num_drafts=config.block_size - 1,
        drafts_per_step=max_drafts_per_step(drafter),
        num_layers=config.num_hidden_layers,
        target_layer_ids=list(config.target_layer_ids),
        num_target_layers=config.num_target_layers if config.num_target_layers is not None else "?",
        mask_token_id=config.mask_token_id,
        hidden_size=config.hidden_size,
        num_parameters=f"{sum(p.numel() for p in drafter.parameters()):,}",
        dtype=str(next(drafter.parameters()).dtype).replace("torch.", ""),
        bench=_bench_view(bench) if bench is not None else None,
        training=_recipe_rows(training_summary or {}),
        dflash_hf_version=__version__,
    )
    # Rendered here rather than by ModelCard.from_template, whose plain jinja2.Template leaves a blank line per
    # block tag and renders a misspelt variable as an empty string; ModelCard then parses the YAML header back.
    environment = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    content = environment.from_string(_card_template()).render(**variables)
    return str(ModelCard(content))


def _card_template() -> str:
    package = Path(__file__).resolve().parents[1]  # dflash_hf/
    # The repository keeps templates in model_cards/ at its top (DESIGN §2); an installed wheel may carry them
    # inside the package instead.
    for candidate in (package.parent / "model_cards" / CARD_TEMPLATE, package / "model_cards" / CARD_TEMPLATE):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise FileNotFoundError(f"model card template {CARD_TEMPLATE} not found next to the dflash_hf package.")


def _recipe_rows(summary: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(key, value) table rows of a training recipe; a nested recipe (an earlier stage) gets prefixed keys."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict):
            rows += _recipe_rows(value, prefix=f"{prefix}{key} › ")
        else:
            rows.append((f"{prefix}{key}", _plain(value)))
    return rows


def _plain(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _load_bench(path: Path) -> dict:
    """Read and check a ``dflash-hf bench`` results JSON; the card shows nothing that is not in it."""
    try:
        bench = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the benchmark JSON {path}: {err}") from err
    if not isinstance(bench, dict):
        raise ValueError(f"{path} must hold a JSON object (the output of `dflash-hf bench`).")
    missing = [key for key in BENCH_KEYS if key not in bench]
    if missing:
        raise ValueError(f"{path} lacks {missing}; is it the results JSON written by `dflash-hf bench`?")
    methods = bench["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"{path}: 'methods' must map method names to results; got {methods!r}.")
    for name, result in methods.items():
        if not isinstance(result, dict):
            raise ValueError(f"{path}: methods[{name!r}] must be an object; got {result!r}.")
        for key in ("tokens_per_s", "speedup"):
            if not _is_number(result.get(key)):
                raise ValueError(f"{path}: methods[{name!r}][{key!r}] must be a number; got {result.get(key)!r}.")
        mal = result.get("mean_acceptance_length")
        if mal is not None and not _is_number(mal):
            raise ValueError(f"{path}: methods[{name!r}]['mean_acceptance_length'] must be a number or null.")
    return bench


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bench_view(bench: dict) -> dict:
    from .bench import METHOD_LABELS  # not at the top: the CLI's parser imports this module, and bench loads torch

    methods = bench["methods"]
    order = [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)
    rows = [
        {
            "label": METHOD_LABELS.get(m, m),
            "tokens_per_s": f"{methods[m]['tokens_per_s']:.1f}",
            "speedup": f"{methods[m]['speedup']:.2f}×",
            "mean_acceptance_length": "—" if methods[m].get("mean_acceptance_length") is None
            else f"{methods[m]['mean_acceptance_length']:.2f}",
        }
        for m in order
    ]
    command = bench["command"] or "# not recorded: the benchmark was not run through the `dflash-hf bench` command"
    view = {key: bench[key] for key in BENCH_KEYS}
    view.update(rows=rows, command=command, lossless=bool(bench["lossless"]), step_cost=_step_cost_view(bench),
                suites=_suites_view(bench), cpu_model=_cpu_line(bench), drafter_dtype=bench.get("drafter_dtype"))
    return view


def _suites_view(bench: dict) -> list[dict]:
    """The per-suite rows of ``dflash-hf bench --suite`` (``bench_suites.json``'s ``suites``), when the bench has them."""
    rows = bench.get("suites")
    if not isinstance(rows, list):
        return []
    return [
        {"suite": row["suite"], "prompts": row["prompts"],
         "mean_acceptance_length": f"{row['mean_acceptance_length']:.2f}", "speedup": f"{row['speedup']:.2f}×",
         "lossless": f"{row['lossless_prompts']}/{row['prompts']}"}
        for row in rows
        if isinstance(row, dict) and _is_number(row.get("mean_acceptance_length")) and _is_number(row.get("speedup"))
    ]


def _cpu_line(bench: dict) -> str | None:
    info = bench.get("cpu_info")
    if not isinstance(info, dict) or not info.get("cpu_model"):
        return None
    return (f"{info['cpu_model']} (family {info.get('cpu_family')}, model {info.get('cpu_model_number')}, "
            f"AVX512-BF16 {'yes' if info.get('avx512_bf16') else 'no'}), {bench.get('threads')} threads")


def _step_cost_view(bench: dict) -> dict | None:
    """The bench's per-step accounting (draft, verify, plain token, and the CPU control), when it recorded one."""
    cost = bench.get("step_cost")
    keys = ("draft_ms_per_step", "verify_ms_per_step", "plain_ms_per_token", "break_even_acceptance_length")
    if not isinstance(cost, dict) or not all(_is_number(cost.get(k)) for k in keys):
        return None
    view = {k: f"{cost[k]:.1f}" for k in keys[:3]}
    view["break_even"] = f"{cost['break_even_acceptance_length']:.2f}"
    if _is_number(cost.get("two_row_forward_ms")) and _is_number(cost.get("speedup_over_two_row_decode")):
        view["two_row_forward_ms"] = f"{cost['two_row_forward_ms']:.1f}"
        view["speedup_over_two_row_decode"] = f"{cost['speedup_over_two_row_decode']:.2f}×"
    return view


# ----------------------------------------------------------------------------------------------------------------
# Publish
# ----------------------------------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def publish(
    out_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DFlash drafter",
    api: Any = None,
) -> list[str]:
    """Upload an exported drafter folder to the Hub model repository ``repo_id`` (created if needed).

    Returns the uploaded files (relative paths). With ``dry_run`` nothing is created or uploaded. The token comes
    from ``token``, else from HF_TOKEN or the stored ``hf auth login``, which huggingface_hub resolves itself.
    """
    folder = Path(out_dir)
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"repo_id must look like 'org/name'; got {repo_id!r}.")
    problems = hub_folder_problems(folder)
    if problems:
        raise ValueError(f"{folder} is not ready to publish:\n  - " + "\n  - ".join(problems))
    files = _publishable_files(folder)
    if dry_run:
        return files
    secrets = [s for s in (token, os.environ.get("HF_TOKEN")) if s]
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            repo_type="model",
            allow_patterns=files,  # exactly what the dry run lists
        )
    except Exception as err:
        # Chaining would carry the original exception, whose text or request headers may hold the token.
        reason = _redact(f"{type(err).__name__}: {err}", secrets)
        raise HubPublishError(f"publishing {folder} to {repo_id} failed: {reason}") from None
    return files


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def add_cli(subparsers: Any, **parser_options: Any) -> None:
    """Register ``export`` and ``publish`` on the ``dflash-hf`` command's subparsers.

    ``parser_options`` go to each ``add_parser`` call (the ``dflash-hf`` command passes its help formatter)."""
    export = subparsers.add_parser("export", help="turn a trained drafter checkpoint into a Hub-ready folder",
                                   **parser_options)
    export.add_argument("checkpoint", help="drafter checkpoint folder (config.json + model.safetensors)")
    export.add_argument("out_dir", help="folder to write (replaced atomically if it holds an earlier export)")
    export.add_argument("--base-model", required=True, help="Hub id of the target model, e.g. Qwen/Qwen3-8B")
    export.add_argument("--bench-json", help="results JSON of dflash-hf bench, for the card's results table")
    export.add_argument("--training-json", help="training.json written by dflash-hf train, for the card's recipe "
                                                "(default: the training.json in CHECKPOINT, if any)")
    export.add_argument("--license", default="apache-2.0", help="license id for the model card's metadata")
    export.add_argument("--model-name", help="card title; give the Hub id (org/name) for copy-paste snippets")
    export.add_argument("--num-speculative-tokens", type=int, metavar="K",
                        help="store K as the drafter's default drafts verified per step (default: keep the "
                             "checkpoint's, else all block_size - 1)")
    export.set_defaults(func=_cmd_export)

    pub = subparsers.add_parser("publish", help="upload an exported drafter folder to the Hugging Face Hub",
                                **parser_options)
    pub.add_argument("out_dir", help="folder written by dflash-hf export")
    pub.add_argument("--repo-id", required=True, help="ORG/NAME of the model repository (created if missing)")
    pub.add_argument("--private", action="store_true", help="create the repository private")
    pub.add_argument("--dry-run", action="store_true", help="check and list the files, upload nothing")
    pub.add_argument("--commit-message", default="Upload DFlash drafter", help="message of the Hub commit")
    pub.set_defaults(func=_cmd_publish)


def _cli_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as err:
            print(f"dflash-hf: error: {err}", file=sys.stderr)
            return 2
        except HubPublishError as err:
            print(f"dflash-hf: error: {err}", file=sys.stderr)
            return 1

    return wrapped


@_cli_errors
def _cmd_export(args: argparse.Namespace) -> int:
    training = json.loads(Path(args.training_json).read_text(encoding="utf-8")) if args.training_json else None
    out = export_drafter(args.checkpoint, args.out_dir, base_model=args.base_model, bench_json=args.bench_json,
                         license=args.license, model_name=args.model_name, training_summary=training,
                         num_speculative_tokens=args.num_speculative_tokens)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    print(f"exported DFlash drafter to {out}")
    print(f"  block size {config['block_size']}, {config['num_hidden_layers']} layer(s), "
          f"target layers {config['dflash_config']['target_layer_ids']}, "
          f"mask token {config['dflash_config']['mask_token_id']}, "
          f"{config.get('num_speculative_tokens') or config['block_size'] - 1} drafts verified per step")
    print(f"  model card results: {'from ' + args.bench_json if args.bench_json else 'none recorded'}")
    print(f"  files: {', '.join(_publishable_files(out))}")
    print(f"next: dflash-hf publish {out} --repo-id ORG/NAME --dry-run")
    return 0


@_cli_errors
def _cmd_publish(args: argparse.Namespace) -> int:
    files = publish(args.out_dir, args.repo_id, private=args.private, dry_run=args.dry_run,
                    commit_message=args.commit_message)
    folder = Path(args.out_dir)
    if args.dry_run:
        print(f"dry run: would upload {len(files)} files from {folder} to https://huggingface.co/{args.repo_id}"
              f"{' (private)' if args.private else ''}")
    else:
        print(f"uploaded {len(files)} files from {folder} to https://huggingface.co/{args.repo_id}")
    for name in files:
        size = (folder / name).stat().st_size
        print(f"  {name:<40} {size:>14,} bytes")
    return 0


__all__ = [
    "HubPublishError",
    "add_cli",
    "check_serving_contract",
    "export_drafter",
    "hub_folder_problems",
    "publish",
    "render_model_card",
]
