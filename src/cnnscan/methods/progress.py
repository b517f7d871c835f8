"""The progress bar of a method that runs many forwards or steps: shown only on a terminal
(tqdm's `disable=None`) and cleared when done, so it never litters logs or reports."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(name: str, total: int, unit: str = "it", counted: str = "forwards") -> tqdm:
    """A bar "NAME: TOTAL COUNTED" over `total` units of work."""
    desc = f"{name}: {total} {counted}"
    return tqdm(total=total, desc=desc, disable=None, leave=False, unit=unit)
