#!/usr/bin/env bash
# One command to set up the course and open it: a virtualenv in .venv, PyTorch, the package with
# the course's extras, then JupyterLab on nbs/. Run it again any time; it only installs what is missing.
#   TORCH_SPEC   what to pip-install for PyTorch (default: torch, or torch==2.13.0 where that CPU build is on disk)
#   NO_LAB=1     set up only, do not start JupyterLab
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install ${TORCH_SPEC:-torch}
fi
python -c "import diffcourse, nbdev" 2>/dev/null || pip install -e ".[dev]"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "Tip: 'sudo apt-get install dataset-fashion-mnist' gives Fashion-MNIST offline; otherwise it downloads on first use."
fi
[ -n "${NO_LAB:-}" ] || exec jupyter lab nbs/
