"""The machine a benchmark ran on, read from ``/proc/cpuinfo``: a number is never separated from its CPU.

Standard library only. Off Linux (no ``/proc/cpuinfo``) the fields are None and ``platform`` fills the model.
"""

from __future__ import annotations

import os
import platform

# Flags that decide reduced-precision speed on CPUs: bf16 matmuls are native only with avx512_bf16 (or AMX).
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def parse_cpuinfo(text: str) -> dict:
    """Model name, family, model number and the reported flags of the first processor in ``text``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: every core of a machine reports the same
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name"),
        "cpu_family": _int_or_none(fields.get("cpu family")),
        "cpu_model_number": _int_or_none(fields.get("model")),
        **{flag: flag in flags for flag in REPORTED_FLAGS},
    }


def cpu_facts(path: str = "/proc/cpuinfo") -> dict:
    """``parse_cpuinfo`` of this machine, plus its logical CPU count."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            facts = parse_cpuinfo(handle.read())
    except OSError:
        facts = {"cpu_model": None, "cpu_family": None, "cpu_model_number": None,
                 **{flag: None for flag in REPORTED_FLAGS}}
    facts["cpu_model"] = facts["cpu_model"] or platform.processor() or platform.machine()
    facts["logical_cpus"] = os.cpu_count()
    return facts


def describe_cpu(facts: dict | None = None) -> str:
    """``MODEL (family F, model M, avx512_bf16 B)`` of ``facts`` (default: this machine's ``cpu_facts()``), the
    line a benchmark prints beside its timings."""
    facts = cpu_facts() if facts is None else facts
    return (f"{facts['cpu_model']} (family {facts['cpu_family']}, model {facts['cpu_model_number']}, "
            f"avx512_bf16 {facts['avx512_bf16']})")


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: a dtype as logs, JSON and folder names spell it."""
    return str(dtype).replace("torch.", "")


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


__all__ = ["REPORTED_FLAGS", "cpu_facts", "describe_cpu", "dtype_name", "parse_cpuinfo"]
