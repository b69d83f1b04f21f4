#!/usr/bin/env bash
# One command to set up the course and open it: a virtualenv in .venv, PyTorch, the package with
# the course's extras, then JupyterLab on nbs/. Run it again any time; it only installs what is missing.
#   bash tools/start.sh [JUPYTER LAB OPTIONS]   e.g. --port 8899 --no-browser (passed on to `jupyter lab`)
#   TORCH_SPEC   what to pip-install for PyTorch when torch is missing (default: torch; torch==2.13.0 when
#                pip's find-links folder holds that CPU wheel, as on the course's build machines)
#   NO_LAB=1     set up only, do not start JupyterLab
# As root (a container, a fresh cloud VM) JupyterLab refuses to start without --allow-root: it is added.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_SPEC:-}" ]; then
    TORCH_SPEC=torch
    for d in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
      if compgen -G "${d#file://}/torch-2.13.0+cpu-*.whl" >/dev/null; then TORCH_SPEC=torch==2.13.0; fi
    done
  fi
  pip install $TORCH_SPEC   # unquoted on purpose: e.g. TORCH_SPEC="torch --index-url URL"
fi
python -c "import diffcourse, nbdev" 2>/dev/null || pip install -e ".[dev]"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "Tip: 'sudo apt-get install dataset-fashion-mnist' gives Fashion-MNIST offline; otherwise it downloads on first use."
fi
[ -z "${NO_LAB:-}" ] || exit 0
lab_args=()
[ "$(id -u)" -ne 0 ] || lab_args+=(--allow-root)
exec jupyter lab nbs/ "${lab_args[@]}" "$@"
