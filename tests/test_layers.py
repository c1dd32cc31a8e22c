"""The package's layers, read from the tree and from the imports of its modules (every import, also those inside
functions). Imports only go downward: the command line -> tools -> training -> core; the shared utilities
(``fileio``, ``machine``) sit beside the core and import nothing of ours; the core imports only itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dflash_hf"
UTILITIES = {"fileio", "machine"}  # used by every layer above the core
TOP = {"__init__", "cli"}  # the public API's lazy names, and the command line
# What each layer may import, besides itself. "version" is ``from .. import __version__``.
MAY_IMPORT = {
    "core": set(),
    "utilities": set(),
    "training": {"core", "utilities"},
    "tools": {"core", "utilities", "training", "version"},
    "cli": {"core", "utilities", "training", "tools", "version"},
    "__init__": {"core", "training", "tools"},
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> str:
    """The layer of a module, given its dotted name (``dflash_hf.core.modeling_dflash``)."""
    parts = name.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[0] in ("core", "training", "tools"):
        return parts[0]
    if parts[0] in UTILITIES:
        return "utilities"
    if parts[0] == "__version__":
        return "version"
    return parts[0]  # cli, kernels


def own_imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """The dotted names of our modules (or ``package.name`` for ``from package import name``) ``path`` imports."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("dflash_hf"):
                continue
            found |= {base} if node.module and base != "dflash_hf" else {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dflash_hf")}
    return found - {name}


SOURCES = sorted(PACKAGE.rglob("*.py"))
LAYER_FOLDERS = ("core", "training", "tools")


def test_the_tree_is_the_layers():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(LAYER_FOLDERS)
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP | UTILITIES, "a new module belongs in core/, training/ or tools/"
    for folder in LAYER_FOLDERS:
        assert not [p for p in (PACKAGE / folder).iterdir() if p.is_dir() and p.name != "__pycache__"], "one level"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_only_go_downward(path):
    mine = layer_of(module_name(path))
    allowed = MAY_IMPORT[mine] | {mine}
    wrong = sorted(name for name in own_imports(path) if layer_of(name) not in allowed)
    assert not wrong, f"{module_name(path)} ({mine}) imports {wrong}: only {sorted(allowed)} are below it"


def test_the_core_imports_nothing_of_the_package_by_name():
    # remote code runs where dflash_hf is not installed: the core reaches its siblings by relative imports only
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} reaches outside core/"
                assert node.level == 1 or not (node.module or "").startswith("dflash_hf"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dflash_hf") for a in node.names), path.name


def test_the_checker_sees_a_wrong_import(tmp_path):
    # the rule can fail: a training module importing a tool or the command line, a core module importing a utility
    root = tmp_path / "dflash_hf"
    (root / "training").mkdir(parents=True)
    (root / "core").mkdir()
    bad_training = root / "training" / "x.py"
    bad_training.write_text("from ..tools.bench import run_bench\nfrom . import data\n\ndef f():\n"
                            "    from dflash_hf.cli import main\n")
    bad_core = root / "core" / "y.py"
    bad_core.write_text("from .. import fileio\nfrom .modeling_dflash import DraftCache\n")
    assert own_imports(bad_training, root) == {"dflash_hf.tools.bench", "dflash_hf.training.data", "dflash_hf.cli"}
    wrong = {layer_of(n) for n in own_imports(bad_training, root)} - MAY_IMPORT["training"] - {"training"}
    assert wrong == {"tools", "cli"}
    assert {layer_of(n) for n in own_imports(bad_core, root)} == {"utilities", "core"}
    assert "utilities" not in MAY_IMPORT["core"]


def test_own_imports_resolves_relative_imports():
    found = own_imports(PACKAGE / "tools" / "bench.py")
    assert "dflash_hf.core.modeling_dflash" in found and "dflash_hf.training.data" in found
    assert "dflash_hf.fileio" in found
    assert own_imports(PACKAGE / "core" / "modeling_dflash.py") <= {
        module_name(p) for p in (PACKAGE / "core").glob("*.py")} | {"dflash_hf.core"}
