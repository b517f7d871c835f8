"""docs/audit.md's example, computed at build time: the Clever-Hans data set of
`cnnscan.spray.demo` explained with LRP by a batch run, audited, its clusters as a table on the
page and its audit.html published next to it (audit-example.html)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import cnnscan
from cnnscan.spray.demo import clever_hans_images, clever_hans_model

PAGE = "audit-example.html"


@functools.cache
def run() -> tuple[str, str]:
    """(the markdown section, the audit page's HTML) of one audit of the demo set."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        table, stamped = clever_hans_images(root / "images")
        model = clever_hans_model()
        found = cnnscan.audit(table, method="lrp", out=root / "audit", model=model, progress=False)
        html = (root / "audit" / "audit.html").read_text(encoding="utf-8")
        members = found.members.to_pylist()
        lines = [
            "",
            "## The example, computed when this site was built",
            "",
            "`cnnscan.audit` of the Clever-Hans set (`cnnscan.spray.demo`: 32 pictures, LRP "
            f"maps); the whole page it wrote: [{PAGE}]({PAGE}).",
            "",
            "| class | cluster | maps | of them stamped | accuracy | mean confidence | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in found.clusters.to_pylist():
            inside = [
                m
                for m in members
                if m["class_id"] == row["class_id"] and m["cluster"] == row["cluster"]
            ]
            marked = sum(stamped[m["path"]] for m in inside)
            accuracy = "–" if row["accuracy"] is None else f"{row['accuracy']:.0%}"
            verdict = f"**suspicious**: {row['reason']}" if row["suspicious"] else "–"
            lines.append(
                f"| {row['class_name']} | {row['cluster']} | {row['size']} | {marked} | "
                f"{accuracy} | {row['mean_confidence']:.0%} | {verdict} |"
            )
    return "\n".join(lines) + "\n", html
