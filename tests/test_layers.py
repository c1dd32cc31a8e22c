"""The package's layers, read from the imports of its modules (every import, also those inside functions):
the portable core imports only itself, nothing imports the command line, the training layer imports no tool, and
the shared utilities import nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_checkpoints_and_dispatch import PORTABLE_FILES

PACKAGE = Path(__file__).resolve().parents[1] / "dflash_hf"
CORE = {name.removesuffix(".py") for name in PORTABLE_FILES}
UTILITIES = {"fileio", "machine"}  # used by every layer above the core
TRAINING = {"data", "prompt_sources", "training", "pipeline", "traffic", "adapt", "vllm_server", "campaign",
            "loading", "options",
            "default_pair"}  # loads the offline default pair (no command logic): loading and campaign load through it
TOOLS = {"cli", "bench", "suites", "hub", "calibration", "draft_precision", "__init__"}


def own_imports(module: str) -> set[str]:
    """The sibling modules ``module`` imports (``from .x import``, ``from . import x``, ``dflash_hf.x``)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and (node.module or "").startswith("dflash_hf"):
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dflash_hf.")}
    return found - {module}


MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer():
    placed = CORE | UTILITIES | TRAINING | TOOLS
    assert set(MODULES) - placed == set(), "put each new module in a layer here"
    assert placed - set(MODULES) == set(), "a layer names a module that no longer exists"


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_imports_only_itself(module):
    assert own_imports(module) <= CORE, f"{module} imports {own_imports(module) - CORE}, outside the shipped core"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "cli"])
def test_nothing_imports_the_command_line(module):
    assert "cli" not in own_imports(module), f"{module} imports cli: move what it needs below the command line"


@pytest.mark.parametrize("module", sorted(TRAINING))
def test_training_imports_no_tool(module):
    tools = own_imports(module) & TOOLS
    assert tools == set(), f"{module} imports {tools}: move what it needs down into the training layer or below"


@pytest.mark.parametrize("module", sorted(UTILITIES))
def test_the_utilities_import_nothing_of_ours(module):
    assert own_imports(module) == set()


def test_the_reader_sees_what_the_core_is():
    # the core is what ships: a module named *_dflash.py (or the compat module) is core, and only those
    assert CORE == {m for m in MODULES if m.endswith("_dflash") or m == "transformers_compat"}
