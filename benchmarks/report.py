"""docs/benchmarks.md from benchmarks/results.json (tables, targets, plots)."""

from __future__ import annotations

from pathlib import Path

from pocketzo.plots import comparison_figure

LABELS = {
    "pocketzo-rademacher": "pocketzo ZO step, Rademacher",
    "pocketzo-gaussian": "pocketzo ZO step, Gaussian",
    "inference": "pocketzo inference only (baked forward)",
    "torch-mezo": "PyTorch MeZO (re-implemented loop)",
    "torch-adamw": "PyTorch backprop + AdamW",
    "ort-training": "ONNX Runtime training 1.19.2 + AdamW",
}
TITLES = {"opt-125m": "OPT-125m shape (random init)", "smollm2-135m": "SmolLM2-135M-Instruct (real weights)",
          "opt-1.3b": "OPT-1.3B shape (random init)"}


def _rows(modes: dict) -> list[dict]:
    rows = []
    for key in ("pocketzo-rademacher", "pocketzo-gaussian", "inference", "torch-mezo", "torch-adamw", "ort-training"):
        if key == "inference":
            src = modes.get("pocketzo-rademacher", {})
            if "forward_baked_s" not in src:
                continue
            r = {"step_s": src["forward_baked_s"], "peak_rss_mb": src["inference_peak_rss_mb"],
                 "note": "one forward pass (not a step)"}
        elif key in modes:
            r = dict(modes[key])
        else:
            continue
        r["key"], r["name"] = key, LABELS[key]
        rows.append(r)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def write_markdown(results: dict, path: Path, img: Path) -> None:
    s = results["settings"]
    lines = [
        "# Benchmarks: a pocketzo step against what users would pick instead",
        "",
        f"Measured by `{results['command']}` on {results['date']}; machine: {results['machine']['platform']}, "
        f"{results['machine']['cpus']} CPUs, no GPU. Every mode ran in a fresh process, on the same model, "
        f"batch {s['batch_size']} x seq {s['seq_len']} (random tokens, no padding), {s['threads']} threads, "
        f"all parameters trainable; step = median of {s['steps']} timed steps after {s['warmup']} warm-up steps. "
        "Peak RSS is the whole process (VmHWM). Raw numbers: `benchmarks/results.json`; "
        "the per-mode JSON files (with memory timelines) are in `$POCKETZO_CACHE/bench/`.",
        "",
        "The machine has 2 cores and is shared: timings of repeated runs differ by 5-20 %. Ratios come from "
        "the same run.",
        "",
    ]
    for key, model in results["models"].items():
        modes = model["modes"]
        rows = _rows(modes)
        pz = modes.get("pocketzo-rademacher", {})
        lines += [f"## {TITLES.get(key, key)}", ""]
        if key == "opt-1.3b":
            lines += _scale(modes)
        else:
            lines += ["| mode | step (s) | peak RSS (MB) | step ÷ pocketzo step | peak RSS ÷ pocketzo | note |",
                      "|---|---|---|---|---|---|"]
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r['name']} | – | – | – | – | not measured: {r['error']} |")
                    continue
                ratio_t = r["step_s"] / pz["step_s"] if pz.get("step_s") else None
                ratio_m = r["peak_rss_mb"] / pz["peak_rss_mb"] if pz.get("peak_rss_mb") else None
                lines.append(f"| {r['name']} | {r['step_s']:.3f} | {r['peak_rss_mb']:,.0f} | {_fmt(ratio_t, '.2f')} "
                             f"| {_fmt(ratio_m, '.2f')} | {r.get('note', '')} |")
            lines += [""] + _pocketzo_detail(modes) + [""] + _targets(key, modes)
            png = comparison_figure([r for r in rows if "error" not in r], img / f"compare-{key}.png",
                                    TITLES.get(key, key))
            lines += ["", f"![step and memory per mode]({png.relative_to(path.parent)})", ""]
        for name in ("pocketzo-rademacher", "pocketzo-gaussian", "pocketzo-rademacher-no-arena"):
            if modes.get(name, {}).get("plot") and "error" not in modes[name]:
                lines += [f"![{name} breakdown and memory over time]({modes[name]['plot']})", ""]
    path.write_text("\n".join(lines) + "\n")


def _pocketzo_detail(modes: dict) -> list[str]:
    out = ["| pocketzo | forward, baked (s) | forward, training session (s) | step (s) | of which forwards | "
           "of which noise passes | step ÷ 2 baked forwards | training ÷ inference peak RSS |",
           "|---|---|---|---|---|---|---|---|"]
    for name in ("pocketzo-rademacher", "pocketzo-gaussian"):
        r = modes.get(name)
        if not r or "error" in r:
            continue
        out.append(f"| {name.split('-')[1]} | {r['forward_baked_s']:.3f} | {r['forward_train_s']:.3f} | "
                   f"{r['step_s']:.3f} | {r['step_forward_s']:.3f} | {r['step_noise_s']:.3f} | "
                   f"{r['overhead_ratio']:.3f} | {r['memory_ratio']:.3f} |")
    return out


def _targets(key: str, modes: dict) -> list[str]:
    rad, gau = modes.get("pocketzo-rademacher", {}), modes.get("pocketzo-gaussian", {})
    mezo, adamw = modes.get("torch-mezo", {}), modes.get("torch-adamw", {})

    def row(what: str, target: str, value: float | None, ok: bool | None) -> str:
        verdict = "–" if ok is None else ("met" if ok else "**not met**")
        return f"| {what} | {target} | {_fmt(value, '.3f')} | {verdict} |"

    def get(r: dict, k: str) -> float | None:
        return r.get(k) if "error" not in r else None

    speed = get(mezo, "step_s") / rad["step_s"] if get(mezo, "step_s") and get(rad, "step_s") else None
    speed_same_noise = get(mezo, "step_s") / gau["step_s"] if get(mezo, "step_s") and get(gau, "step_s") else None
    mem = get(adamw, "peak_rss_mb") / rad["peak_rss_mb"] if get(adamw, "peak_rss_mb") and get(rad, "peak_rss_mb") \
        else None
    items = [
        ("training ÷ inference peak RSS (Rademacher)", "<= 1.03", get(rad, "memory_ratio")),
        ("step ÷ 2 baked forwards, Rademacher", "<= 1.15", get(rad, "overhead_ratio")),
        ("step ÷ 2 baked forwards, Gaussian", "<= 1.3", get(gau, "overhead_ratio")),
        ("PyTorch MeZO step ÷ pocketzo step (default, Rademacher)", ">= 2.5", speed),
        ("PyTorch MeZO step ÷ pocketzo Gaussian step (MeZO's own noise)", ">= 2.5", speed_same_noise),
        ("PyTorch AdamW peak RSS ÷ pocketzo peak RSS", ">= 2.9", mem),
    ]
    out = ["| target | wanted | measured | |", "|---|---|---|---|"]
    for what, target, value in items:
        op, bound = target.split()
        ok = None if value is None else (value <= float(bound) if op == "<=" else value >= float(bound))
        out.append(row(what, target, value, ok))
    return out


def _scale(modes: dict) -> list[str]:
    runs = [(name, modes.get(key, {})) for name, key in
            (("ONNX Runtime arena on (default)", "pocketzo-rademacher"),
             ("arena off (--no-cpu-mem-arena)", "pocketzo-rademacher-no-arena"))]
    runs = [(n, r) for n, r in runs if r]
    if not runs:
        return ["Not measured.", ""]
    rows = [
        ("trainable parameters", lambda r: f"{r['trainable_parameters']:,}"),
        ("step (s), median", lambda r: f"{r['step_s']:.2f}"),
        ("forward, baked (s)", lambda r: f"{r['forward_baked_s']:.2f}"),
        ("step ÷ 2 baked forwards", lambda r: f"{r['overhead_ratio']:.3f}"),
        ("peak RSS, training", lambda r: f"{r['peak_rss_mb'] / 1e3:.2f} GB"),
        ("peak RSS, inference of the same graph", lambda r: f"{r['inference_peak_rss_mb'] / 1e3:.2f} GB"),
        ("target: training peak RSS <= 5.5 GB", lambda r: "met" if r["peak_rss_mb"] <= 5500 else "**not met**"),
    ]
    out = ["| full-parameter ZO, Rademacher | " + " | ".join(n for n, _ in runs) + " |",
           "|---|" + "---|" * len(runs)]
    for what, cell in rows:
        out.append(f"| {what} | " + " | ".join("–" if "error" in r else cell(r) for _, r in runs) + " |")
    out += ["| PocketLLM (2024), OPT-1.3B on a phone, derivative-free | about 6.5 GB (published) |"
            + " |" * (len(runs) - 1), "",
            "GB = 10^9 bytes. fp32 weights alone are 1,315,758,080 x 4 B = 5.26 GB; the rest is the "
            "interpreter, ONNX Runtime and the activations of one forward pass.", ""]
    for _, r in runs:
        if "error" in r:
            out += [f"Not measured: {r['error']}", ""]
    return out
