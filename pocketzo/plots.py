"""Figures for bench reports (desktop only: needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from pocketzo.errors import PocketzoError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PocketzoError("plots need matplotlib: pip install 'pocketzo[plot]' (a desktop extra)") from None
    return plt


def bench_figure(report: dict, path: str | Path) -> Path:
    """Step-time breakdown (left) and RSS over time of both bench processes (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    fwd, noise, baked = report["step_forward_s"], report["step_noise_s"], report["forward_baked_s"]
    left.bar(["2 baked\nforwards", "ZO step"], [2 * baked, fwd], color=["#9bb7d4", "#3a6ea5"], label="forward passes")
    left.bar(["ZO step"], [noise], bottom=[fwd], color="#e07a5f", label="noise passes")
    left.set_ylabel("seconds")
    left.set_title(f"step / 2 forwards = {report['overhead_ratio']:.2f}")
    left.legend(loc="lower right", fontsize=8)
    for name, color in (("train", "#3a6ea5"), ("baked", "#9bb7d4")):
        samples = report["timeline"][name]["samples"]
        if samples:
            t, mb = zip(*samples, strict=True)
            right.plot(t, mb, color=color, label=f"{name} process")
        for at, label in report["timeline"][name]["marks"]:
            if name == "train":
                right.axvline(at, color="#999", lw=0.6, ls=":")
                right.annotate(label, (at, 0), xytext=(2, 4), textcoords="offset points", fontsize=7, color="#555")
    right.set_xlabel("seconds since process start")
    right.set_ylabel("RSS (MB)")
    right.set_ylim(bottom=0)
    right.set_title(f"peak {report['peak_rss_mb']:,.0f} MB training, "
                    f"{report['inference_peak_rss_mb']:,.0f} MB inference")
    right.legend(loc="lower right", fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"{Path(report['bundle']).name}: batch {cfg['batch_size']} x {cfg['seq_len']}, "
                 f"{cfg['threads']} threads, {cfg['perturbation']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_figure(rows: list[dict], path: str | Path, title: str) -> Path:
    """Step seconds and peak RSS per mode (``rows``: name, step_s, peak_rss_mb; missing values skipped)."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("step_s")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.6))
    names = [r["name"] for r in rows]
    colors = ["#3a6ea5" if r["name"].startswith("pocketzo") else "#b0b0b0" for r in rows]
    a.barh(names, [r["step_s"] for r in rows], color=colors)
    a.set_xlabel("seconds per step (median)")
    b.barh(names, [r["peak_rss_mb"] for r in rows], color=colors)
    b.set_xlabel("peak RSS (MB)")
    b.set_yticks([])
    for ax in (a, b):
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(curves: dict[str, list[tuple[float, float]]], levels: dict[str, float], path: str | Path,
                  title: str, ylabel: str) -> Path:
    """A score against training minutes per method (``curves``: name -> [(minutes, score)], the mean over
    seeds), with the untrained rows as horizontal lines (``levels``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, points) in enumerate(curves.items()):
        x, y = zip(*sorted(points), strict=True)
        # past ten curves the colours repeat: another marker and line style tell them apart
        ax.plot(x, y, marker="os^"[i // 10 % 3], ls=("-", "--", ":")[i // 10 % 3], ms=4, color=plt.cm.tab10(i % 10),
                label=name)
    for j, (name, value) in enumerate(levels.items()):
        ax.axhline(value, color="#888", lw=1, ls=("--", ":", "-.")[j % 3], label=name)
    ax.set_xlabel("training minutes (this machine, 2 threads)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_accuracy_figure(points: list[tuple[str, float, float, float, float]], baseline: float, path: str | Path,
                           title: str) -> Path:
    """Accuracy against peak memory, one point per method (``points``: name, peak MB, its std, accuracy %, its
    std), with the untrained model's accuracy as a horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, mb, mb_std, acc, acc_std) in enumerate(points):
        ax.errorbar(mb / 1e3, acc, xerr=mb_std / 1e3, yerr=acc_std, fmt="os^Dv"[i % 5], ms=7, capsize=3,
                    color=plt.cm.tab10(i % 10), label=name)
    ax.axhline(baseline, color="#888", lw=1, ls="--", label=f"untrained ({baseline:.1f} %)")
    ax.set_xlabel("peak RSS of the training process (GB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=min(baseline, *(p[3] - p[4] for p in points)) - 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
