"""The CLI reference page: `--help` of the `cnnscan` command and of every subcommand, read
from the argparse parser itself, so that a new subcommand appears without edits."""

from __future__ import annotations

import argparse
import os

from cnnscan.cli import _parser

WIDTH = "100"  # argparse wraps at $COLUMNS: fix it so the page does not depend on the terminal


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, in the order they were added."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def page() -> str:
    """Markdown: the top-level help, then one section per subcommand."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = _parser()
        parts = [
            "# Command-line reference",
            "",
            "Generated from `cnnscan --help` and `cnnscan COMMAND --help` when the site is "
            "built. Errors print one line (`cnnscan: error: ...`) and exit with code 1; "
            "`--debug` shows the traceback.",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, sub in subcommands(parser).items():
            parts += ["", f"## cnnscan {name}", "", "```text", sub.format_help().rstrip(), "```"]
        return "\n".join(parts) + "\n"
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
