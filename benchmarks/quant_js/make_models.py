"""Block-quantized embedding tables in ONNX Runtime for JavaScript: the same function as in Python?

    python benchmarks/quant_js/make_models.py          # graphs + Python's outputs -> benchmarks/work/quant_js/
    cd benchmarks/quant_js && npm install --ignore-scripts && node run.mjs node && node run.mjs web

The graphs are those of tests/test_quantize_embedding.py (a 50 x 64 table tied to an LM head), quantized by
``export --quantize``'s code at 8 and 4 bits, with and without zero points. ``run.mjs`` runs each in
onnxruntime-node (native CPU) or onnxruntime-web (wasm) and prints the largest difference from Python's
outputs (``--ignore-scripts``: onnxruntime-node's install script fetches GPU binaries from nuget.org; its CPU
binary is in the npm package).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from test_quantize_embedding import _graph, _run  # noqa: E402  (the graphs the tests check)

from pocketzo.export.config import QuantRecipe  # noqa: E402
from pocketzo.export.quantize import quantize_frozen  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "quant_js"


def main() -> int:
    ids = np.array([[0, 3, 7, 49], [3, 3, 1, 2]], dtype=np.int64)
    expected = {}
    for mode in ("int8", "int4"):
        for symmetric in (True, False):
            folder = WORK / f"{mode}-{'symmetric' if symmetric else 'zero-points'}"
            folder.mkdir(parents=True, exist_ok=True)
            path, _, _ = _graph(folder, tied=True)
            quantize_frozen(path, QuantRecipe(mode, block_size=16, symmetric=symmetric))
            expected[str(folder)] = {k: v.ravel().tolist() for k, v in _run(path, ids).items()}
    (WORK / "expected.json").write_text(json.dumps({"ids": ids.ravel().tolist(), "expected": expected}))
    print(f"wrote {len(expected)} graphs and Python's outputs to {WORK}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
