"""Every ```python block of README.md and docs/ runs as pasted: Sybil runs a file's blocks in
order in one namespace (as a reader pasting them one after another), offline, in a scratch
folder. A block that cannot run here is preceded by `<!-- skip: next "reason" -->`, and the
reason is required."""

from __future__ import annotations

import re
from pathlib import Path
from unittest import SkipTest

import pytest

sybil = pytest.importorskip("sybil")
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser  # noqa: E402
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PARSER = sybil.Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])
FENCES = RawFencedCodeBlockLexer(re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE))


def _examples(path: Path) -> list:
    return list(PARSER.parse(path))


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _is_skip(example) -> bool:
    return isinstance(example.parsed, tuple)  # (action, reason) of a skip directive


WITH_CODE = [p for p in PAGES if any(not _is_skip(e) for e in _examples(p))]


@pytest.mark.slow
@pytest.mark.parametrize("path", WITH_CODE, ids=_name)
def test_python_blocks_run_in_order(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files (out/, photos/) write them here
    monkeypatch.setenv("CNNSCAN_OFFLINE", "1")  # a download would fail at once, not hang
    for example in _examples(path):
        try:
            example.evaluate()
        except SkipTest:
            continue


def test_every_skipped_block_says_why():
    skips = [(p, e) for p in PAGES for e in _examples(p) if _is_skip(e)]
    assert skips  # the README's batch and model-file examples, at least
    for path, example in skips:
        action, reason = example.parsed
        where = f"{_name(path)}:{example.line}"
        assert action == "next", where
        assert reason and len(reason.strip().strip("\"'")) > 10, f"{where}: give the reason"


def test_python_blocks_are_fenced_as_plain_python():
    # `python notest` or `py` would be silently left out here (and breaks the docs site's
    # fences): skip with the comment instead
    for path in PAGES:
        for region in FENCES(sybil.Document.parse(str(path))):
            info = region.lexemes["info"].strip()
            if info.lower().startswith("py"):
                assert info == "python", f"{_name(path)}: fence info {info!r}"
