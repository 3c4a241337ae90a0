# Sourced by the GPU scripts: sets PY to a Python that imports torch (LAFS_GPU_CHECK_PYTHON, else
# $ROOT/.venv/bin/python, else python3), or leaves it empty; ROOT must be set.
PY=${LAFS_GPU_CHECK_PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in "$ROOT/.venv/bin/python" python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY=$candidate; break
    fi
  done
fi
