"""dflash-hf: DFlash block-diffusion speculative decoding for transformers.

    import dflash_hf
    drafter = dflash_hf.DFlashDraftModel.from_pretrained("z-lab/Qwen3-8B-DFlash-b16")
    out = target.generate(input_ids, assistant_model=drafter, max_new_tokens=256)   # same tokens, faster

Importing the package installs the (idempotent) generate patch; so does loading a drafter's remote code.

The public names load on first use, and the patch is installed as soon as transformers' generation module (or
ours, which imports it) has loaded, at once when it already has; so ``import dflash_hf`` and ``dflash-hf --help``
do not pay for torch. No model can call ``generate`` before that module has loaded: the patch is always in time.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DFlashCandidateGenerator": "core.patch_dflash",
    "DFlashConfig": "core.configuration_dflash",
    "DFlashDraftModel": "core.modeling_dflash",
    "DFlashStats": "core.generation_dflash",
    "default_target_folder": "training.default_pair",
    "default_target_layer_ids": "core.configuration_dflash",
    "install_generate_patch": "core.patch_dflash",
    "load_default_pair": "training.default_pair",
    "measure_verify_costs": "tools.calibration",
    "record_traffic": "training.traffic",
    "run_pipeline": "training.pipeline",
    "TrainSpec": "training.pipeline",
    "export_drafter": "tools.hub",
}
_TRANSFORMERS_GENERATION = "transformers.generation.utils"
_OUR_GENERATION = f"{__name__}.core.patch_dflash"  # the module that holds install_generate_patch


def __getattr__(name: str) -> Any:
    """The public names, and the submodules (``dflash_hf.tools.hub``), imported when first asked for."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but a dependency of it is missing: say so
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _install_patch_once_loaded(finished: str) -> None:
    """Called as each watched module finishes loading: installs the patch once both are loaded."""
    ours = sys.modules.get(_OUR_GENERATION)
    if finished == _TRANSFORMERS_GENERATION:
        if ours is None:  # dflash_hf was imported before transformers: load ours now, which installs it
            importlib.import_module(_OUR_GENERATION)
        # else ours is loading right now (it imports transformers' first) and installs once it is done
        return
    ours.install_generate_patch()  # ours has loaded, so transformers' has too
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


class _PatchingLoader(importlib.abc.Loader):
    """Runs a watched module as its own loader would, then reports that it has loaded."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _install_patch_once_loaded(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, …: the wrapped loader's
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Import hook on transformers' generation module and ours; removed once the patch is installed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (_TRANSFORMERS_GENERATION, _OUR_GENERATION):
            return None
        for finder in sys.meta_path:  # the other finders, as the import system would ask them
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_HOOK = _PatchOnImport()
if _TRANSFORMERS_GENERATION in sys.modules:
    importlib.import_module(_OUR_GENERATION).install_generate_patch()
else:
    sys.meta_path.insert(0, _HOOK)

__all__ = [
    "DFlashCandidateGenerator",
    "DFlashConfig",
    "DFlashDraftModel",
    "DFlashStats",
    "default_target_folder",
    "default_target_layer_ids",
    "install_generate_patch",
    "load_default_pair",
    "record_traffic",
    "run_pipeline",
    "TrainSpec",
    "export_drafter",
]
