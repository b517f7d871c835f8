"""Dataset mode: explain (and evaluate) a folder, glob or table of images into Parquet
tables and compressed arrays, resumably, in-process or on Ray.

    import cnnscan.batch
    results = cnnscan.batch.run("photos/", ["gradcam", "integrated_gradients"], "results/")
    results.rows().to_pandas()            # image × method × target
    results.array(results.rows().to_pylist()[0])   # one map
"""

from cnnscan.batch.compute import Explainer, Settings
from cnnscan.batch.inputs import IMAGE_EXTENSIONS, Item, discover
from cnnscan.batch.runner import run
from cnnscan.batch.store import Part, Results
from cnnscan.batch.summary import summarize, write_summary

__all__ = [
    "IMAGE_EXTENSIONS",
    "Explainer",
    "Item",
    "Part",
    "Results",
    "Settings",
    "discover",
    "load",
    "run",
    "summarize",
    "write_summary",
]


def load(out: str) -> Results:
    """The results of a batch run (committed parts only), by its output folder."""
    return Results(out)
