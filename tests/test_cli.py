"""The CLI: one-line errors with a non-zero exit; eval --json; the device-side import boundary."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pocketzo.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pocketzo", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["eval", "{tmp}/missing", "--data", "{tmp}/x.jsonl"], "bundle directory not found"),
    (["train", "{bundle}", "--data", "{tmp}/missing.jsonl", "--steps", "1", "--out", "{tmp}/run"], "not found"),
    (["train", "{bundle}", "--data", "{train}", "--steps", "1", "--out", "{tmp}/run", "--eps", "0"], "eps must be"),
    (["eval", "{bundle}", "--data", "{train}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["eval", "{bundle}", "--data", "{train}", "--threads", "-1"], "threads must be >= 0"),
    (["eval", "{bundle}", "--data", "{tmp}"], "cannot read it"),
    (["train", "{bundle}", "--data", "{train}", "--steps", "1", "--out", "{train}"], "is not a directory"),
])
def test_errors_are_one_line_without_traceback(args, message, bundles, sentiment_files, tmp_path):
    fill = {"tmp": tmp_path, "bundle": bundles("llama-norms"), "train": sentiment_files["train"]}
    proc = _run(*[a.format(**fill) for a in args])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("pocketzo: error:")
    assert not (tmp_path / "run").exists()


def test_train_then_eval_json(bundles, sentiment_files, tmp_path, capsys):
    b = bundles("llama-classify")
    assert main(["train", str(b), "--data", str(sentiment_files["train"]), "--steps", "30", "--out",
                 str(tmp_path / "run"), "--lr", "1e-3", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(b), "--data", str(sentiment_files["dev"]), "--json",
                 "--weights", str(tmp_path / "run" / "weights.safetensors")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["n"] == 64 and {"loss", "accuracy", "macro_f1"} <= trained.keys()
    assert main(["eval", str(b), "--data", str(sentiment_files["dev"]), "--json"]) == 0
    untrained = json.loads(capsys.readouterr().out)
    assert trained["loss"] != untrained["loss"]  # --weights was applied


def test_run_directory_is_not_silently_overwritten(bundles, sentiment_files, tmp_path):
    args = ["train", bundles("llama-norms"), "--data", sentiment_files["train"], "--steps", "2", "--out",
            tmp_path / "run", "--quiet"]
    assert _run(*args).returncode == 0
    again = _run(*args)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert _run(*args, "--overwrite").returncode == 0


def test_flags_come_from_the_config_dataclasses():
    from pocketzo.cli import build_parser

    p = build_parser()
    ev = p.parse_args(["eval", "b", "--data", "d", "--no-cpu-mem-arena", "--optimization", "basic"])
    assert ev.cpu_mem_arena is False and ev.mem_pattern is True and ev.optimization == "basic"
    ex = p.parse_args(["export", "m", "--out", "o", "--task", "classify", "--labels", "neg, pos"])
    assert ex.labels == ("neg", "pos") and ex.max_length == 256 and ex.template is None
    tr = p.parse_args(["train", "b", "--data", "d", "--out", "o", "--lr", "0.1", "--threads", "2"])
    assert tr.lr == 0.1 and tr.threads == 2 and not hasattr(tr, "eps")  # only given flags: resume compares them


def test_a_new_run_needs_steps_data_and_out(capsys):
    assert main(["train", "b", "--data", "d", "--out", "o"]) == 1
    assert "a new run needs --steps N" in capsys.readouterr().err
    assert main(["train", "--steps", "3"]) == 1
    assert "a new run needs BUNDLE, --data, --out (or --resume RUN to continue one)" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    proc = _run("eval", tmp_path / "missing", "--data", tmp_path / "x.jsonl", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "BundleError" in proc.stderr


def test_device_side_does_not_import_desktop_libraries():
    code = ("import sys, pocketzo.runtime, pocketzo.runtime.data, pocketzo.zo_trainer, pocketzo.mobile_harness, "
            "pocketzo.cli; pocketzo.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'optimum', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_device_commands_run_without_the_exporter_or_desktop_libraries(bundles, sentiment_files, tmp_path):
    """A phone gets pocketzo without export/ and without torch: train, eval and bench must not need them."""
    blocked = ("pocketzo.export", "torch", "transformers", "onnx", "onnxscript", "optimum", "matplotlib")
    b, data = bundles("llama-norms"), sentiment_files["train"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None  # any import of them fails\n"
            "from pocketzo.cli import main\n"
            f"assert main(['train', {str(b)!r}, '--data', {str(data)!r}, '--steps', '2', '--out', "
            f"{str(tmp_path / 'run')!r}, '--quiet']) == 0\n"
            f"assert main(['eval', {str(b)!r}, '--data', {str(data)!r}]) == 0\n"
            f"assert main(['bench', {str(b)!r}, '--batch-size', '1', '--seq-len', '4', '--steps', '1']) == 0\n"
            f"assert main(['export', 'm', '--out', {str(tmp_path / 'x')!r}]) == 1\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "runs on the desktop" in proc.stderr


ROOT = Path(__file__).resolve().parent.parent


def test_the_cli_reference_lists_every_flag_and_is_current():
    """docs/cli.md is generated from the parser: a new or renamed flag fails here until it is regenerated."""
    from pocketzo.cli import build_parser
    from pocketzo.cli_reference import reference

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {flag}" for name, sub in commands.choices.items() for a in sub._actions
               for flag in a.option_strings if flag.lstrip("-") not in page and flag not in ("-h", "--help")]
    assert not missing, f"docs/cli.md lacks {missing}: python -m pocketzo.cli_reference > docs/cli.md"
    assert page == reference(), "docs/cli.md is stale: python -m pocketzo.cli_reference > docs/cli.md"


def test_every_command_has_plain_help_and_an_example():
    from pocketzo.cli import EXAMPLES, build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(EXAMPLES) == set(commands.choices)
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert text.rstrip().endswith(f"example: {EXAMPLES[name]}"), name
        assert EXAMPLES[name].startswith(f"pocketzo {name} ")
        assert "``" not in text and "`" not in text, f"{name} --help has markup"
        assert all(a.help for a in sub._actions), f"{name}: a flag without help"


def test_the_readme_stays_a_newcomers_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; measurements belong in docs/"
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", "\n".join(lines)):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_a_first_order_run_prints_no_onnx_runtime_warning(bundles, sentiment_files, tmp_path):
    """The gradient session set session.disable_prepacking twice, and ONNX Runtime warned on every fo run."""
    proc = _run("train", bundles("llama-norms-grad"), "--data", sentiment_files["train"], "--steps", "2",
                "--batch-size", "4", "--out", tmp_path / "run", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "already exists" not in proc.stderr and "onnxruntime" not in proc.stderr, proc.stderr


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
