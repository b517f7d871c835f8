"""Class names: the bundled 1000 ImageNet labels, or a user's list or file."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from cnnscan.errors import ModelError


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order."""
    text = resources.files("cnnscan").joinpath("data/imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def resolve_labels(
    labels: str | Path | list[str] | tuple[str, ...] | None, n: int
) -> tuple[str, ...]:
    """Labels for `n` classes: given names, a file with one name per line, or defaults."""
    if labels is None:
        return imagenet_labels() if n == 1000 else tuple(f"class {i}" for i in range(n))
    if isinstance(labels, str | Path):
        path = Path(labels)
        try:
            labels = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise ModelError(f"cannot read labels file {path}: {e.strerror or e}") from e
    labels = tuple(str(name) for name in labels)
    if len(labels) != n:
        raise ModelError(f"the model has {n} outputs but {len(labels)} labels were given")
    return labels
