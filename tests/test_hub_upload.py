"""hub_upload/: the shipped default drafter folder is exactly what `dflash-hf export` produces."""

from __future__ import annotations

import json
from pathlib import Path

from dflash_hf.tools.hub import check_serving_contract, core_files, export_shipped_drafter

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hub_upload" / "SmolLM2-135M-Instruct-DFlash"
BENCH = ROOT / "hub_upload" / "SmolLM2-135M-Instruct-DFlash.bench.json"


def test_shipped_folder_is_what_export_produces(tmp_path):
    bench = json.loads(BENCH.read_text())
    rebuilt = export_shipped_drafter(tmp_path / "rebuilt")  # what scripts/refresh_shipped_drafter.py writes
    shipped = sorted(p.name for p in SHIPPED.iterdir() if not p.name.startswith((".", "__")))
    assert sorted(p.name for p in rebuilt.iterdir()) == shipped
    for name in shipped:
        a, b = (SHIPPED / name).read_bytes(), (rebuilt / name).read_bytes()
        if name == "config.json":  # the writing transformers version is recorded in it
            a, b = (json.loads(x) for x in (a, b))
            a.pop("transformers_version"), b.pop("transformers_version")
        assert a == b, name
    assert check_serving_contract(SHIPPED) == []
    card = (SHIPPED / "README.md").read_text()
    assert bench["command"] in card
    assert f"{bench['methods']['dflash']['mean_acceptance_length']:.2f}" in card


def test_shipped_card_gives_every_suite_and_the_cpu():
    bench = json.loads(BENCH.read_text())
    card = (SHIPPED / "README.md").read_text()
    assert bench["suites"], "the shipped bench JSON carries the per-suite table of dflash-hf bench --suite"
    for suite in bench["suites"]:
        row = (f"| {suite['suite']} | {suite['prompts']} | {suite['mean_acceptance_length']:.2f} | "
               f"{suite['speedup']:.2f}× | {suite['lossless_prompts']}/{suite['prompts']} |")
        assert row in card, row
    assert bench["cpu_info"]["cpu_model"] in card


def test_the_shipped_code_is_exactly_the_core():
    # the folder's modules are generated from dflash_hf/core/ (scripts/refresh_shipped_drafter.py): the same set,
    # byte for byte, and nothing else
    shipped = {p.name: p.read_bytes() for p in SHIPPED.glob("*.py")}
    core = {p.name: p.read_bytes() for p in core_files()}
    assert sorted(shipped) == sorted(core)
    for name in core:
        assert shipped[name] == core[name], f"{name} differs from dflash_hf/core/{name}: run scripts/refresh_shipped_drafter.py"
