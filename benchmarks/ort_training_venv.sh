#!/usr/bin/env bash
# Create the separate venv that benchmarks/ort_training.py runs in (ONNX Runtime's own on-device training).
#
#   benchmarks/ort_training_venv.sh VENV_DIR
#
# onnxruntime-training ended at 1.19.2 and needs an older onnx than the project's, so it lives in its own venv
# with exactly the pins of shared/FACTS.md ("ONNX Runtime mobile and phones"). Idempotent: a stamp file
# records the pins of a finished install; when it matches, nothing is done. Exits non-zero with a one-line
# reason on stderr when the install fails (for example, no wheel for this platform or Python).
#
# Environment: PYTHON (default python3) is the interpreter the venv is made from; it must be CPython 3.11
# or another version onnxruntime-training-cpu 1.19.2 ships a wheel for.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv=$1
python=${PYTHON:-python3}

# torch==2.13.0 resolves to the local CPU build (+cpu, found through pip's find-links); a bare `torch` would
# pull the CUDA build from the index, GBs of it.
pins=(
    "onnxruntime-training-cpu==1.19.2"
    "onnx==1.16.2"
    "torch==2.13.0"
    "transformers==4.57.6"
    "numpy"
)
stamp="$venv/.pocketzo-ort-training-stamp"
want="${pins[*]}"

if [[ -f "$stamp" && -x "$venv/bin/python" && "$(cat "$stamp")" == "$want" ]]; then
    echo "ort-training venv up to date: $venv"
    exit 0
fi

fail() {
    echo "ort_training_venv.sh: $*" >&2
    exit 1
}

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv" || fail "could not create a venv at $venv with $python"
fi
# Keep the venv out of git wherever it is created (Python >= 3.13 venv does the same by itself).
[[ -f "$venv/.gitignore" ]] || echo '*' >"$venv/.gitignore"
rm -f "$stamp"

log="$venv/pip-install.log"
if ! "$venv/bin/python" -m pip install "${pins[@]}" >"$log" 2>&1; then
    reason=$(grep -m1 -E '^ERROR' "$log" || tail -n1 "$log")
    fail "pip install failed (${reason}); full log: $log"
fi

# Check the pins really took (a resolver may not downgrade what is already there) and that the training API
# imports: `import onnxruntime` in this wheel imports torch.
if ! "$venv/bin/python" - "${pins[@]}" >>"$log" 2>&1 <<'EOF'
import sys
from importlib.metadata import version

for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    have = version(name)
    if want and have.split("+")[0] != want:
        sys.exit(f"{name} is {have}, wanted {want}")
import onnxruntime
from onnxruntime.training import artifacts  # noqa: F401
from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: F401

print("onnxruntime", onnxruntime.__version__)
EOF
then
    fail "installed, but the check failed ($(tail -n1 "$log")); full log: $log"
fi

printf '%s\n' "$want" >"$stamp"
echo "ort-training venv ready: $venv ($(tail -n1 "$log"))"
