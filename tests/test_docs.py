"""The documentation site (mkdocs.yml, tools/docs/): it builds in strict mode with every
registered method in the generated gallery and trust page, a broken link fails the build, the
navigation follows the pages and the registry, and the CLI reference is the real `--help`."""

from __future__ import annotations

import html
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "docs"))

import cli_reference  # noqa: E402
import gallery  # noqa: E402
import hooks  # noqa: E402
import tutorials  # noqa: E402
from mkdocs.commands.build import build  # noqa: E402
from mkdocs.config import load_config  # noqa: E402
from mkdocs.exceptions import Abort, PluginError  # noqa: E402

import cnnscan  # noqa: E402


def _pages(docs: Path, *names: str) -> Path:
    for name in names:
        path = docs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n")
    return docs


def _nav_pages(nav: list) -> list[str]:
    """Every page path of a nav tree, in order."""
    found = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            found += _nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_nav_lists_every_page_with_method_families_in_registry_order(tmp_path):
    # A family page added later (perturbation.md, or one the registry does not know yet)
    # appears without edits; families follow cnnscan.methods.FAMILIES, unknown ones last.
    docs = _pages(
        tmp_path,
        "index.md",
        "methods/zeta.md",
        "methods/perturbation.md",
        "methods/lrp.md",
        "methods/cam.md",
        "methods/gradient.md",
        "extra-notes.md",
        "api.md",
    )
    nav = _nav_pages(hooks.on_config({"docs_dir": str(docs)})["nav"])
    methods = [page for page in nav if page.startswith("methods/")]
    assert methods == [
        "methods/gradient.md",
        "methods/cam.md",
        "methods/lrp.md",
        "methods/perturbation.md",
        "methods/zeta.md",
    ]
    assert {"index.md", "extra-notes.md", "api.md", "gallery.md", "trust.md", "cli.md"} <= set(nav)
    assert nav[-3:] == ["api.md", "cli.md", "architecture.md"]  # the reference comes last
    assert len(nav) == len(set(nav))


def test_a_family_without_a_page_fails_the_build(tmp_path):
    docs = _pages(tmp_path, "methods/gradient.md", "methods/cam.md")
    with pytest.raises(PluginError, match="lrp"):
        hooks.on_pre_build({"docs_dir": str(docs)})


def test_family_pages_must_describe_every_registered_method():
    infos = cnnscan.list_methods("cam")
    page = " ".join(f"`{info.name}`" for info in infos[1:])
    with pytest.raises(PluginError, match=f"does not mention {infos[0].name}"):
        hooks.registry_section("cam", page)
    table = hooks.registry_section("cam", page + f" `{infos[0].name}`")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [info.name for info in infos]


def test_the_api_page_must_document_every_public_name():
    page = SimpleNamespace(file=SimpleNamespace(src_uri="api.md"))
    ids = [f'<h3 id="cnnscan.{name}">' for name in cnnscan.__all__ if name != "explain"]
    with pytest.raises(PluginError, match=r"does not document cnnscan\.explain:"):
        hooks.on_page_content("".join(ids), page, {}, None)
    ids.append('<h3 id="cnnscan.explain">')
    assert hooks.on_page_content("".join(ids), page, {}, None) == "".join(ids)


def test_cli_reference_is_the_help_of_every_subcommand():
    page = cli_reference.page()
    names = list(cli_reference.subcommands(cnnscan.cli._parser()))
    assert {"scan", "explain", "filters", "features", "dream", "layers", "evaluate"} <= set(names)
    for name in names:
        assert f"## cnnscan {name}\n" in page
    # What a user sees in a terminal: `cnnscan evaluate --help` at the page's width.
    env = {**os.environ, "COLUMNS": cli_reference.WIDTH}
    program = "import sys; from cnnscan.cli import main; main(sys.argv[1:])"
    shown = subprocess.run(
        [sys.executable, "-c", program, "evaluate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    section = page.split("## cnnscan evaluate\n\n```text\n", 1)[1].split("\n```", 1)[0]
    assert section == shown.rstrip()


def test_tutorial_pages_carry_every_cell_of_the_notebooks():
    notebooks = tutorials.notebooks()
    assert [path.name for path in notebooks] == [
        "explain_a_prediction.ipynb",
        "what_did_my_network_learn.ipynb",
    ]
    import nbformat

    for path in notebooks:
        page = tutorials.files()[f"tutorials/{path.stem}.md"]
        cells = nbformat.read(path, as_version=4).cells
        at = 0
        for cell in cells:  # every cell, in order
            at = page.index(cell.source.strip(), at)
        assert f"({path.name})" in page  # the download link


def test_fast_mode_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.setenv(gallery.MODE_VARIABLE, "fast")
    assert gallery.settings().photos == ("chelsea",)
    monkeypatch.delenv(gallery.MODE_VARIABLE)
    assert gallery.settings().photos == ("chelsea", "coffee")  # the published build
    monkeypatch.setenv(gallery.MODE_VARIABLE, "quick")
    with pytest.raises(ValueError, match="full, fast"):
        gallery.settings()


@pytest.fixture(scope="module")
def fast_mode():
    previous = os.environ.get(gallery.MODE_VARIABLE)
    os.environ[gallery.MODE_VARIABLE] = "fast"
    yield
    if previous is None:
        os.environ.pop(gallery.MODE_VARIABLE)
    else:
        os.environ[gallery.MODE_VARIABLE] = previous


def _build(site: Path, **overrides) -> None:
    """`mkdocs build --strict --site-dir SITE` in-process (the repository is the cwd: the
    README snippet is read relative to it)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site), strict=True, **overrides))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while the site builds: the gallery is batch-1 work, and on a busy
    2-core CI machine two spin-waiting threads made the build ~10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site(tmp_path_factory, fast_mode, one_thread) -> Path:
    out = tmp_path_factory.mktemp("site")
    _build(out)
    return out


@pytest.mark.slow
def test_site_builds_strict_with_every_method_in_the_gallery(site):
    for page in ["index", "getting-started", "gallery", "trust", "cli", "api", "jupyter"]:
        assert (site / f"{page}.html").is_file(), page
    for family in {info.family for info in cnnscan.list_methods()}:
        assert "Registered methods" in (site / "methods" / f"{family}.html").read_text()
    gallery_page = (site / "gallery.html").read_text()
    for info in cnnscan.list_methods():
        picture = site / "gallery" / f"{info.name}-chelsea.png"
        assert f'src="gallery/{info.name}-chelsea.png"' in gallery_page, info.name
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", info.name
    top1 = cnnscan.predict(cnnscan.load_model(), "sample:chelsea", k=1)[0][0]["class_id"]
    assert f"synthesis-class-{top1}.png" in gallery_page and "filters.png" in gallery_page
    trust_page = (site / "trust.html").read_text()
    for info in cnnscan.list_methods():
        assert f"<code>{info.name}</code>" in trust_page, info.name
    assert "random (chance)" in trust_page
    for page in (gallery_page, trust_page):  # a fast build says so
        assert "fast preview build" in page and gallery.MODE_VARIABLE in page
    api = (site / "api.html").read_text()
    for name in ["cnnscan.explain_many", "cnnscan.explain", "cnnscan.widgets.explorer"]:
        assert f'id="{name}"' in api, name
    # Getting started shows the README's two commands (included, not copied).
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "getting-started.html").read_text()))
    assert "pip install -c constraints.txt -e . && cnnscan scan" in text
    assert 'pip install -c constraints.txt -e ".[test]" && pip install --no-deps' in text
    for stem in ["explain_a_prediction", "what_did_my_network_learn"]:
        assert (site / "tutorials" / f"{stem}.html").is_file()
        assert (site / "tutorials" / f"{stem}.ipynb").is_file()


@pytest.mark.slow
def test_a_broken_link_or_anchor_fails_the_strict_build(site, tmp_path, caplog):
    # Same config and hooks on a copy of docs/ with one page of bad links (the gallery is
    # reused from the first build: same process, same mode).
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "broken.md").write_text(
        "# Broken\n\n[a page](no-such-page.md) and [an anchor](index.md#no-such-anchor)\n"
    )
    with caplog.at_level(logging.WARNING), pytest.raises(Abort, match="strict"):
        _build(tmp_path / "site", docs_dir=str(docs))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no-such-page.md" in w for w in warnings), warnings
    assert any("no-such-anchor" in w for w in warnings), warnings
    assert all("broken.md" in w for w in warnings), warnings  # nothing else is wrong


def test_the_audit_page_gets_its_clever_hans_example_computed_at_build_time():
    page = SimpleNamespace(file=SimpleNamespace(src_uri="audit.md"))
    markdown = hooks.on_page_markdown("# Auditing a model\n", page, {}, None)
    rows = [line for line in markdown.splitlines() if line.startswith("| horse |")]
    assert len(rows) == 2
    flagged = [row for row in rows if "**suspicious**" in row]
    assert len(flagged) == 1 and "| 16 | 16 | 75% |" in flagged[0]  # all 16 maps stamped
    assert "audit-example.html" in markdown
    assert '<div class="cluster suspicious"' in hooks.audit_example.run()[1]
