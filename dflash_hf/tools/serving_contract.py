"""What vLLM's and SGLang's DFlash loaders read from a draft checkpoint, checked on a folder before it is exported or
published (``check_serving_contract``: the list of problems, empty when both servers would load it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    config, problems = read_config(folder)
    if config is None:
        return problems
    problems += _config_contract_problems(config)
    tensors, weight_problems = _read_tensor_shapes(folder)
    problems += weight_problems
    if tensors is not None and not problems:
        # Expected shapes come from the config, so only compare them once the config itself is sound.
        problems += _tensor_contract_problems(config, tensors)
    return problems


def read_config(folder: Path) -> tuple[dict | None, list[str]]:
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

    files, problems = weight_files(folder)
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


def weight_files(folder: Path) -> tuple[list[Path], list[str]]:
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
