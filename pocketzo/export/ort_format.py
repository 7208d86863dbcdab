"""A bundle's graphs in ORT format (``export --ort``): what ONNX Runtime Mobile loads, converted by ONNX Runtime's
own tool, with the one required_operators.config a reduced build of the runtime is made from."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pocketzo.errors import ExportError
from pocketzo.export import split
from pocketzo.runtime.manifest import FILE_NAMES

MODEL, EXTERNAL_DATA, ORT_MODEL = FILE_NAMES["model"], FILE_NAMES["model_data"], FILE_NAMES["ort_model"]
GRADIENT_MODEL, GRADIENT_ORT_MODEL = FILE_NAMES["gradient_model"], FILE_NAMES["gradient_ort_model"]
TRUNK_ORT_MODEL, HEAD_ORT_MODEL = FILE_NAMES["trunk_ort_model"], FILE_NAMES["head_ort_model"]


def convert_to_ort(bundle_dir: Path) -> list[str]:
    """model.onnx (and gradients.onnx) -> model.ort (gradients.ort) + one required_operators.config for
    both, with ONNX Runtime's own converter; returns the .ort files written.

    'Fixed' optimizations for the arm target: the graphs are optimized once, here, as a phone's
    ONNX Runtime would, and the trainable weights stay graph inputs.
    """
    sources, work = bundle_dir / ".ort-in", bundle_dir / ".ort"
    sources.mkdir()
    graphs = (MODEL, EXTERNAL_DATA, GRADIENT_MODEL, split.TRUNK, split.TRUNK_DATA, split.HEAD, split.HEAD_DATA)
    for name in graphs:  # the converter takes a directory of models
        if (bundle_dir / name).is_file():
            (sources / name).symlink_to((bundle_dir / name).resolve())
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(sources),
           "--output_dir", str(work), "--optimization_style", "Fixed", "--target_platform", "arm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wanted = [ORT_MODEL] + ([GRADIENT_ORT_MODEL] if (sources / GRADIENT_MODEL).exists() else [])
    wanted += [TRUNK_ORT_MODEL, HEAD_ORT_MODEL] if (sources / split.TRUNK).exists() else []
    config = work / FILE_NAMES["required_operators"]
    if proc.returncode != 0 or not all((work / n).is_file() for n in wanted) or not config.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise ExportError(f"--ort: ONNX Runtime's converter failed ({lines[-1][:300] if lines else 'no output'})")
    for name in wanted:
        shutil.move(work / name, bundle_dir / name)
    shutil.move(config, bundle_dir / FILE_NAMES["required_operators"])
    shutil.rmtree(work)
    shutil.rmtree(sources)
    return wanted
