#!/usr/bin/env bash
# Run THERE (the lent GPU machine, no network), from the tree the device tool sends, with .whl/
# carried (fetch_wheels.sh): installs the carried wheels into /tmp/site (ahead of the image's own
# packages on PYTHONPATH), installs fastllava editable with no index, prints the versions, then
# runs bench/gpu_suite.py with this script's arguments. The suite copies its results folder to
# $OUT after every part, so a cut-off run still returns what finished.
#   run(command="bash bench/device/run.sh --budget 330", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "run.sh: installing .whl/ failed" >&2; exit 3; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { echo "run.sh: the editable install of fastllava failed" >&2; exit 4; }
python3 - <<'PY' || exit 5
import sys, torch, triton, transformers, fastllava
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "|", torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "no CUDA device")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
exec python3 bench/gpu_suite.py "$@"
