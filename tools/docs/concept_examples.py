"""The concepts page's examples, computed when the site is built: `cnnscan.concepts` of the
bundled model on the gallery's photos (the cat and the coffee in a full build), drawn as
`cnnscan concepts` draws them, so the page shows what the current code gives."""

from __future__ import annotations

import functools

import gallery

import cnnscan
from cnnscan.concept.page import page_html


@functools.cache
def section(mode: str) -> str:
    """Markdown (with the pages' HTML) for the photos of gallery mode `mode`; synthesized
    pictures only in a full build."""
    chosen = gallery.MODES[mode]
    model = cnnscan.load_model()
    lines = [
        "",
        "## The bundled examples",
        "",
        "Computed by `cnnscan.concepts(model, photo, top=6)` on the bundled model when this "
        "site was built" + ("" if mode == "full" else f" ({mode} preview: no pictures)") + ".",
        "",
    ]
    for photo in chosen.photos:
        found = cnnscan.concepts(model, f"sample:{photo}", top=6, pictures=mode == "full")
        html = page_html(found, fragment=True)  # one raw HTML block: no blank lines
        lines += [f"### sample:{photo}", "", "\n".join(filter(str.strip, html.splitlines())), ""]
    return "\n".join(lines) + "\n"
