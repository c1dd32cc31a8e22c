"""The model card of an exported drafter: rendered from the template in ``model_cards/`` with results taken only
from a ``dflash-hf bench`` JSON (``render_model_card``), and the recipe it was trained with."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..machine import dtype_name

CARD_TEMPLATE = "drafter_card.md.jinja"
CARD_TAGS = ["dflash", "speculative-decoding", "block-diffusion", "draft-model"]
BENCH_KEYS = (
    "command", "target", "drafter", "device", "dtype", "max_new_tokens", "num_prompts",
    "transformers_version", "torch_version", "lossless", "methods",
)
METHOD_ORDER = ("plain", "dflash", "dflash_lookup", "prompt_lookup", "transformers_dflash")


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
        dtype=dtype_name(next(drafter.parameters()).dtype),
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


def load_bench(path: Path) -> dict:
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
