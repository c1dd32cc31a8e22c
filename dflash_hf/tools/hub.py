"""Hub export and publishing: a trained drafter becomes a folder that is ready to publish, then a Hub repository.

``export_drafter`` writes the folder atomically: the weights (safetensors only), config.json with ``auto_map``,
the portable core .py files and a model card whose results come only from a ``dflash-hf bench`` JSON.
``publish`` checks that folder and uploads it. Export and publish both refuse a folder that would not serve in vLLM
or SGLang (``serving_contract.py``); the card is rendered by ``model_card.py``."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from ..fileio import make_shareable, staging_dir
from .model_card import load_bench, render_model_card
from .serving_contract import check_serving_contract, read_config, weight_files

CORE_DIR = Path(__file__).resolve().parents[1] / "core"
SHIPPED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHIPPED_MODEL_NAME = "dflash-hf/SmolLM2-135M-Instruct-DFlash"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class HubPublishError(RuntimeError):
    """The Hub refused or failed an upload; the message never contains the token."""


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
    config, problems = read_config(folder)
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
    bench = load_bench(Path(bench_json)) if bench_json is not None else None
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
    config, _ = read_config(out_dir)
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
    if not weight_files(checkpoint)[0]:
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
    target = Path(out_dir) if out_dir is not None else shipped.parent / f".{shipped.name}.refresh-{uuid.uuid4().hex[:8]}"
    # the recipe is the folder's own training.json, which export_drafter carries over
    export_drafter(shipped, target, base_model=SHIPPED_BASE_MODEL, bench_json=bench, model_name=SHIPPED_MODEL_NAME)
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
