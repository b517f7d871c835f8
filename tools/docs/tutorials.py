"""Tutorial pages from the notebooks in examples/: every notebook becomes a page (its
markdown cells as text, its code cells as Python blocks) plus a download of the notebook."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def notebooks() -> list[Path]:
    return sorted(EXAMPLES.glob("*.ipynb"))


def _source(cell: dict) -> str:
    text = cell["source"]
    return "".join(text) if isinstance(text, list) else text


def title(path: Path) -> str:
    """The notebook's first markdown heading (else its file name)."""
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for line in _source(cell).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem.replace("_", " ")


def page(path: Path) -> str:
    """Markdown for one notebook; it links to `NAME.ipynb` next to the page."""
    cells = json.loads(path.read_text())["cells"]
    parts = []
    for cell in cells:
        text = _source(cell).rstrip()
        if not text:
            continue
        if cell["cell_type"] == "markdown":
            parts.append(text)
        elif cell["cell_type"] == "code":
            parts.append(f"```python\n{text}\n```")
        if len(parts) == 1:  # below the title: where to get it and how to run it
            parts.append(
                f"[Download the notebook]({path.name}) (`examples/{path.name}` in the "
                "repository; runs offline on the bundled model: "
                "`pip install -e '.[notebook]'`, then open it in Jupyter)."
            )
    return "\n\n".join(parts) + "\n"


def files() -> dict[str, str | bytes]:
    """Site path -> content: `tutorials/NAME.md` and `tutorials/NAME.ipynb` per notebook."""
    out: dict[str, str | bytes] = {}
    for path in notebooks():
        out[f"tutorials/{path.stem}.md"] = page(path)
        out[f"tutorials/{path.name}"] = path.read_bytes()
    return out
