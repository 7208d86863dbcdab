"""``make bench``: pocketzo against what users would pick instead, same model, batch and threads.

Every mode runs in a fresh process (its peak RSS is its own) and writes one JSON object:

    pocketzo ZO step, Rademacher and Gaussian   pocketzo bench (which also measures the baked
                                                inference forward and its peak RSS)
    PyTorch MeZO, PyTorch backprop + AdamW      benchmarks/torch_baselines.py
    ONNX Runtime training + AdamW (1.19.2)      benchmarks/ort_training.py in its own venv

on the OPT-125m shape (random init) and the real SmolLM2-135M, all parameters trainable, then
pocketzo alone on the OPT-1.3B shape. Writes benchmarks/results.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import make_shape_model

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ORT_VENV = ROOT / ".venv-ort-training"
POCKETLLM_OPT13B_GB = 6.5  # PocketLLM (2024): OPT-1.3B fine-tuned on a phone with derivative-free optimization


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_mode(name: str, cmd: list[str], out: Path, env: dict | None = None) -> dict:
    """Run one mode; its JSON, or {"error": ...} with the reason when it failed."""
    log(f"{name}: {' '.join(map(str, cmd))}")
    out.unlink(missing_ok=True)  # never report a previous run's numbers
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode != 0 and "error" not in result:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        result["error"] = lines[-1][:300] if lines else f"exit code {proc.returncode}"
    result["wall_s"] = time.perf_counter() - t0
    log(f"{name}: " + (f"FAILED: {result['error']}" if "error" in result else
                       f"step {result.get('step_s', 0):.3f} s, peak {result.get('peak_rss_mb', 0):,.0f} MB"))
    return result


def export(model_dir: Path, bundle: Path, reuse: bool) -> None:
    if reuse and (bundle / "manifest.json").is_file():
        return
    log(f"exporting {model_dir} -> {bundle}")
    subprocess.run([PY, "-m", "pocketzo", "export", str(model_dir), "--out", str(bundle), "--task", "causal-lm",
                    "--trainable", "all", "--max-length", "64", "--overwrite"], check=True, cwd=ROOT)


def pocketzo_modes(key: str, bundle: Path, work: Path, shape: list[str], img: Path, variants) -> dict:
    """``variants``: (name, extra bench flags), e.g. ("rademacher", ["--perturbation", "rademacher"])."""
    out = {}
    for variant, flags in variants:
        json_path = work / f"{key}-pocketzo-{variant}.json"
        png = img / f"bench-{key}-{variant}.png"
        out[f"pocketzo-{variant}"] = run_mode(
            f"{key} pocketzo {variant}",
            [PY, "-m", "pocketzo", "bench", bundle, *shape, *flags, "--json", json_path, "--plot", png], json_path)
        out[f"pocketzo-{variant}"]["plot"] = str(png.relative_to(ROOT / "docs"))
    return out


def baseline_modes(key: str, model_dir: Path, work: Path, shape: list[str], llama: bool) -> dict:
    out = {}
    for mode in ("mezo", "adamw"):
        json_path = work / f"{key}-torch-{mode}.json"
        out[f"torch-{mode}"] = run_mode(f"{key} torch {mode}", [
            PY, "benchmarks/torch_baselines.py", "--mode", mode, "--model-dir", model_dir, *shape, "--json",
            json_path], json_path)
    json_path = work / f"{key}-ort-training.json"
    if ort_venv_ready():
        extra = ["--vmap-free-mask"] if llama else []
        out["ort-training"] = run_mode(f"{key} ort-training", [
            ORT_VENV / "bin" / "python", "benchmarks/ort_training.py", "--model-dir", model_dir, *shape, "--json",
            json_path, "--work", work / "ort-training", *extra], json_path)
        if extra and "error" not in out["ort-training"]:
            out["ort-training"]["note"] = ("exported with transformers' older vmap-free mask function: the legacy "
                                           "exporter cannot trace the default one")
    else:
        out["ort-training"] = {"error": _ort_venv_error}
    return out


_ort_venv_error = ""


def ort_venv_ready() -> bool:
    global _ort_venv_error
    proc = subprocess.run(["bash", "benchmarks/ort_training_venv.sh", str(ORT_VENV)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        _ort_venv_error = "onnxruntime-training 1.19.2 did not install: " + (lines[-1] if lines else "unknown")
    return proc.returncode == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("POCKETZO_CACHE",
                                                                        Path.home() / ".cache" / "pocketzo")))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-scale", action="store_true", help="skip the OPT-1.3B shape")
    p.add_argument("--reuse-bundles", action="store_true",
                   help="keep bundles exported by an earlier run (default: export again, so they match this code)")
    p.add_argument("--only", choices=("opt-125m", "smollm2-135m", "opt-1.3b"), action="append")
    a = p.parse_args()
    work = a.cache / "bench"
    work.mkdir(parents=True, exist_ok=True)
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    shape = ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--threads", str(a.threads),
             "--steps", str(a.steps), "--warmup", str(a.warmup)]
    smollm2 = a.cache / "smollm2-135m-instruct"
    models = {
        "opt-125m": (lambda: make_shape_model("opt-125m", work / "models" / "opt-125m", smollm2), False),
        "smollm2-135m": (lambda: smollm2, True),
        "opt-1.3b": (lambda: make_shape_model("opt-1.3b", work / "models" / "opt-1.3b", smollm2), False),
    }
    chosen = a.only or [k for k in models if not (a.skip_scale and k == "opt-1.3b")]
    results_path = ROOT / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("models", {})
    for key in chosen:
        make_dir, llama = models[key]
        model_dir = make_dir()
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"{model_dir}: missing; run `pocketzo assets` first")
        bundle = work / "bundles" / key
        export(model_dir, bundle, a.reuse_bundles)
        if key == "opt-1.3b":  # pocketzo only: the point is whether full-parameter ZO fits a phone
            scale = ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--threads", str(a.threads),
                     "--steps", "3", "--warmup", "1"]
            modes = pocketzo_modes(key, bundle, work, scale, img, [
                ("rademacher", ["--perturbation", "rademacher"]),
                ("rademacher-no-arena", ["--perturbation", "rademacher", "--no-cpu-mem-arena"])])
        else:
            modes = pocketzo_modes(key, bundle, work, shape, img, [
                ("rademacher", ["--perturbation", "rademacher"]), ("gaussian", ["--perturbation", "gaussian"])])
            modes.update(baseline_modes(key, model_dir, work, shape, llama))
        results["models"][key] = {"model_dir": str(model_dir), "modes": modes}
        results["command"] = "make bench"
        results["settings"] = {"batch_size": a.batch_size, "seq_len": a.seq_len, "threads": a.threads,
                               "steps": a.steps, "warmup": a.warmup}
        results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version()}
        results["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_strip_timelines(results), indent=2) + "\n")
        tmp.replace(results_path)
    from report import write_markdown

    write_markdown(results, ROOT / "docs" / "benchmarks.md", img)
    log(f"wrote {results_path} and docs/benchmarks.md")
    return 0


def _strip_timelines(results: dict) -> dict:
    """results.json keeps the numbers; the per-sample memory timelines stay in the per-mode JSON files."""
    out = json.loads(json.dumps(results))
    for model in out["models"].values():
        for mode in model["modes"].values():
            mode.pop("timeline", None)
    return out


if __name__ == "__main__":
    sys.exit(main())
