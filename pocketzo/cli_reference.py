"""docs/cli.md, generated from the ``pocketzo`` parser itself, so that the reference cannot drift from the flags.

    python -m pocketzo.cli_reference > docs/cli.md

``tests/test_cli.py`` fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import argparse

from pocketzo.cli import DESCRIPTION, EXAMPLES, build_parser

HEADER = """\
# The `pocketzo` command line (reference)

Generated from the parser by `python -m pocketzo.cli_reference > docs/cli.md`; a test fails when a flag is missing
here. `pocketzo COMMAND --help` prints the same. Every command also takes `--debug` (tracebacks, and ONNX Runtime's
own warnings, which are silenced otherwise). Desktop commands need the `export` extra (torch, transformers, onnx);
device commands need only numpy, onnxruntime and tokenizers.
"""


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest.upper()}`"
    flag = " / ".join(action.option_strings)
    if action.choices:
        flag += " {" + ",".join(str(c) for c in action.choices) + "}"
    elif action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        flag += " " + (action.metavar or action.dest.upper())
    return f"`{flag}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    """The whole page, as markdown."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help for c in commands._choices_actions}
    out = [HEADER, f"{DESCRIPTION}\n", "| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#pocketzo-{name}) | {_cell(summaries[name])} |" for name in commands.choices]
    for name, sub in commands.choices.items():
        description = "\n\n".join(" ".join(par.split()) for par in sub.description.split("\n\n"))
        out += ["", f"## pocketzo {name}", "", description, "", "```sh", EXAMPLES[name], "```", "",
                "| option | what it does |", "|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.dest == "debug":
                continue
            required = " (required)" if action.required and action.option_strings else ""
            out.append(f"| {_flag(action)} | {_cell(action.help or '')}{required} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
