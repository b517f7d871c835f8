"""MkDocs hooks (see mkdocs.yml): the navigation from the pages that exist and the method
registry, generated pages (gallery, trust, CLI reference, tutorials, the audit example)
computed at build time,
and a generated list of each family's registered methods appended to its page.

A registered method without a family page, or not mentioned on its family's page, and a
name of `cnnscan.__all__` missing from the API page fail the build, so that what is added
later cannot go undocumented. `CNNSCAN_DOCS_GALLERY=fast` selects quick settings (gallery.py).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import audit_example
import cli_reference
import concept_examples
import gallery
import trust
import tutorials
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

import cnnscan
from cnnscan.methods import FAMILIES

log = logging.getLogger("mkdocs.hooks.cnnscan")

# Pages in reading order (those missing are left out); any other page in docs/ is appended.
SECTIONS = [
    ("Home", "index.md"),
    ("Getting started", "getting-started.md"),
    ("Tutorials", "tutorials"),
    ("Explaining predictions", "methods"),
    ("Gallery", "gallery.md"),
    ("Which method should I trust?", ["trust.md", "evaluation.md"]),
    ("What the network learned", ["learned.md", "synthesis.md", "concepts.md"]),
    ("Models", "models.md"),
    ("Jupyter", "jupyter.md"),
    ("Web app", "app.md"),
    ("Batch", ["batch.md", "audit.md"]),
]
REFERENCE = ("Reference", ["api.md", "cli.md", "architecture.md"])
GENERATED = {"gallery.md", "trust.md", "cli.md"}


def families() -> list[str]:
    """Families of the registered methods, in the registry's order."""
    return list(dict.fromkeys(info.family for info in cnnscan.list_methods()))


def _method_pages(docs: Path) -> list[str]:
    """docs/methods/*.md: the registry's families first (in its order), then any other."""
    present = {path.stem for path in (docs / "methods").glob("*.md")}
    order = [f for f in [*FAMILIES, *families()] if f in present]
    order += sorted(present - set(order))
    return [f"methods/{name}.md" for name in dict.fromkeys(order)]


def on_config(config: Any) -> Any:
    """Build the navigation from the pages present (new pages appear without edits)."""
    docs = Path(config["docs_dir"])
    nav: list[Any] = []
    listed: set[str] = set()
    for title, entry in SECTIONS:
        if entry == "tutorials":
            pages = [
                {tutorials.title(path): f"tutorials/{path.stem}.md"}
                for path in tutorials.notebooks()
            ]
        elif entry == "methods":
            pages = _method_pages(docs)
        else:  # hand-written pages that exist (another branch may not have landed yet)
            pages = [entry] if isinstance(entry, str) else entry
            pages = [p for p in pages if p in GENERATED or (docs / p).is_file()]
        names = [p if isinstance(p, str) else next(iter(p.values())) for p in pages]
        listed.update(names)
        single = isinstance(entry, str) and entry.endswith(".md")
        if pages:
            nav.append({title: pages[0] if single else pages})
    others = sorted(
        path.relative_to(docs).as_posix()
        for path in docs.rglob("*.md")
        if path.relative_to(docs).as_posix() not in listed | set(REFERENCE[1])
    )
    nav += others
    nav.append({REFERENCE[0]: REFERENCE[1]})
    config["nav"] = nav
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages and pictures (computed once per process: see gallery.cached)."""
    began = time.perf_counter()
    generated: dict[str, str | bytes] = {"cli.md": cli_reference.page(), **tutorials.files()}
    run = gallery.cached(log.info)
    pages = {file.src_uri for file in files if file.src_uri.endswith(".md")}
    generated.update(gallery.files(run, pages))
    generated.update(trust.files(run, log.info))
    if "audit.md" in pages:
        generated[audit_example.PAGE] = audit_example.run()[1]
    for path, content in generated.items():
        if files.get_file_from_path(path) is not None:
            raise PluginError(f"generated page {path} would replace a file in docs/")
        files.append(File.generated(config, path, content=content))
    timings = ", ".join(f"{key} {value:.1f} s" for key, value in run.seconds.items())
    log.info(
        f"generated pages ({run.settings.mode}) in {time.perf_counter() - began:.1f} s ({timings})"
    )
    return files


def registry_section(family: str, page: str) -> str:
    """Markdown listing the family's registered methods; fails if one is undocumented."""
    infos = cnnscan.list_methods(family)
    missing = [info.name for info in infos if f"`{info.name}`" not in page]
    if missing:
        raise PluginError(
            f"docs/methods/{family}.md does not mention {', '.join(missing)}: describe every "
            "registered method (formula, paper) on its family's page"
        )
    lines = [
        "",
        "## Registered methods",
        "",
        "Generated from the method registry (`cnnscan.list_methods()` / `cnnscan methods`) "
        "when this site was built; every method's pictures are in the "
        "[gallery](../gallery.md).",
        "",
        "| method | what it computes | options (defaults) | cost | paper |",
        "|---|---|---|---|---|",
    ]
    for info in infos:
        options = ", ".join(f"`{key}={value!r}`" for key, value in info.options().items())
        cost = info.cost or "–"
        if not info.in_default_scan:
            cost += " (not in the default scan: `--full`)"
        lines.append(
            f"| `{info.name}` | {gallery.table_cell(info.description)} | {options or '–'} | "
            f"{cost} | {info.paper or '–'} |"
        )
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Append the registry's list to each family page and to the evaluation page, and the
    computed examples to the concepts page."""
    uri = page.file.src_uri
    if uri.startswith("methods/") and Path(uri).stem in families():
        return markdown.rstrip() + "\n" + registry_section(Path(uri).stem, markdown)
    if uri == "evaluation.md":
        return markdown.rstrip() + "\n" + metric_section()
    if uri == "audit.md":
        return markdown.rstrip() + "\n" + audit_example.run()[0]
    if uri == "concepts.md":
        return markdown.rstrip() + "\n" + concept_examples.section(gallery.settings().mode)
    return markdown


def metric_section() -> str:
    """Markdown listing every registered metric (docs/evaluation.md)."""
    from cnnscan.metrics import list_metrics

    better = {True: "higher", False: "lower", None: "a verdict"}
    lines = [
        "",
        "## Registered metrics",
        "",
        "Generated from the metric registry (`cnnscan.metrics.list_metrics()`) when this site "
        "was built.",
        "",
        "| metric | family | what it measures | better | needs a region | cost | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for info in list_metrics():
        lines.append(
            f"| `{info.name}` | {info.family} | {gallery.table_cell(info.description)} | "
            f"{better[info.higher_is_better]} | {'yes' if info.needs_region else 'no'} | "
            f"{info.cost or '–'} | {info.paper or '–'} |"
        )
    return "\n".join(lines) + "\n"


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """The API reference documents every name of `cnnscan.__all__` (a name that griffe
    does not list under `::: cnnscan` needs its own `:::` entry)."""
    if page.file.src_uri == "api.md":
        documented = set(re.findall(r'id="cnnscan(?:\.[\w.]+)?\.(\w+)"', html))
        missing = [name for name in cnnscan.__all__ if name not in documented]
        if missing:
            raise PluginError(
                f"docs/api.md does not document cnnscan.{', cnnscan.'.join(missing)}: add "
                "`::: cnnscan.MODULE.NAME` for each"
            )
    return html


def on_pre_build(config: Any) -> None:
    """Every family of registered methods has its page."""
    docs = Path(config["docs_dir"])
    missing = [f for f in families() if not (docs / "methods" / f"{f}.md").is_file()]
    if missing:
        raise PluginError(
            f"no page for the method famil{'ies' if len(missing) > 1 else 'y'} "
            f"{', '.join(missing)}: add docs/methods/NAME.md"
        )
