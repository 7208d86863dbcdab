"""Phone-sized fine-tuning: LoRA step cost and the memory of LoRA over an int4 base, with `pocketzo bench`.

    SmolLM2-135M (real), LoRA r8 on q_proj,v_proj, fp32 base: step / (2 x forward)
    OPT-1.3B shape, LoRA over an fp32, 8-bit and 4-bit base: forward, step and peak RSS of training
    (full-parameter fp32: docs/benchmarks.md)

Each bundle is a `pocketzo export --task causal-lm --peft lora`; each measurement is `pocketzo bench`
(baked and training workers in fresh processes), batch 8 x 64, 2 threads. Writes benchmarks/phone_sized.json.

    python benchmarks/phone_sized.py --cache ~/.cache/pocketzo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import make_shape_model

ROOT = Path(__file__).resolve().parents[1]


def pocketzo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pocketzo", *args], check=True, cwd=ROOT, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "phone_sized")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "phone_sized.json")
    ap.add_argument("--only", help="comma-separated case names")
    args = ap.parse_args()
    smollm2 = args.cache / "smollm2-135m-instruct"
    models = {"smollm2": lambda: smollm2,
              # the shape models of `make bench`, made once in the same cache
              "opt-1.3b": lambda: make_shape_model("opt-1.3b", args.cache / "bench" / "models" / "opt-1.3b", smollm2)}
    cases = {  # name: (model, extra export flags)
        "smollm2-lora": ("smollm2", []),
        "opt-1.3b-lora-int4": ("opt-1.3b", ["--quantize", "int4", "--quant-accuracy-level", "4"]),
        "opt-1.3b-lora-int4-a0": ("opt-1.3b", ["--quantize", "int4"]),
        "opt-1.3b-lora-int8-a0": ("opt-1.3b", ["--quantize", "int8"]),
        "opt-1.3b-lora-fp32": ("opt-1.3b", []),
    }
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name, (model, flags) in cases.items():
        if args.only and name not in args.only.split(","):
            continue
        bundle, report = args.work / name, args.work / f"{name}.json"
        print(f"[phone_sized {time.strftime('%H:%M:%S')}] {name}: export", flush=True)
        pocketzo("export", str(models[model]()), "--out", str(bundle), "--task", "causal-lm", "--peft", "lora",
                 "--max-length", "64", *flags, "--overwrite")
        print(f"[phone_sized {time.strftime('%H:%M:%S')}] {name}: bench", flush=True)
        pocketzo("bench", str(bundle), "--batch-size", "8", "--seq-len", "64", "--threads", "2", "--json", str(report))
        r = json.loads(report.read_text())
        results[name] = {k: r.get(k) for k in ("step_s", "forward_train_s", "forward_baked_s", "step_forward_s",
                                               "step_noise_s", "peak_rss_mb", "inference_peak_rss_mb",
                                               "trainable_parameters", "rss_end_mb")}
        results[name]["export_flags"] = " ".join(flags)
        results[name]["step_over_2_forwards"] = r["step_s"] / (2 * r["forward_train_s"])
        results[name]["bundle_mb"] = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 1e6
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        print(json.dumps({name: results[name]}), flush=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
