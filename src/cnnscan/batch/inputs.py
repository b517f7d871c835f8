"""What a batch run reads: a folder (recursive), a glob, one image, or a CSV/Parquet table
with a path column (optionally a label column and box columns x0, y0, x1, y1).

Each image becomes an `Item` with an absolute path and a stable `image_id` (its path
relative to the folder, the path as matched by the glob, or the table's `id` column / path
as written), which is what resume uses to know which images are done. Problems that
concern one image (a label that names no class, a malformed box) are kept on the item and
land in the errors table; only problems with the listing itself raise.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnnscan.errors import BatchError, TargetError
from cnnscan.targets import class_id_of

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
TABLE_EXTENSIONS = frozenset({".csv", ".parquet", ".pq"})
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class Item:
    """One image to explain: where it is, its id, its label (class id) and object box (in the
    picture's pixels), and a problem that makes it an error row without being read."""

    path: str
    image_id: str
    label: int | None = None
    box: tuple[float, float, float, float] | None = None
    problem: str | None = None
    raw_label: Any = None  # as written in the table, resolved to `label` by `resolve_labels`

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "image_id": self.image_id,
            "label": self.label,
            "box": list(self.box) if self.box is not None else None,
            "problem": self.problem,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        box = tuple(data["box"]) if data.get("box") is not None else None
        return cls(data["path"], data["image_id"], data.get("label"), box, data.get("problem"))


def discover(
    source: str | Path | Sequence[str | Path],
    *,
    path_column: str = "path",
    label_column: str = "label",
    id_column: str = "id",
) -> list[Item]:
    """The images of `source` in a stable order (sorted for folders and globs, table order
    for tables). A list of paths is taken as given."""
    if isinstance(source, list | tuple):
        items = [Item(_absolute(p), str(p)) for p in source]
    else:
        text = str(source)
        path = Path(text)
        if path.is_dir():
            items = _folder(path)
        elif path.is_file() and path.suffix.lower() in TABLE_EXTENSIONS:
            items = _table(path, path_column, label_column, id_column)
        elif path.is_file():
            items = [Item(_absolute(path), path.name)]
        elif glob.has_magic(text):
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            items = [Item(_absolute(p), p) for p in matches]
        else:
            raise BatchError(
                f"input {text!r} does not exist; give a folder of images, a glob such as "
                "'photos/**/*.jpg', or a CSV/Parquet file with a 'path' column"
            )
    if not items:
        raise BatchError(
            f"no images found in {source!s} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    _check_unique(items)
    return items


def _folder(root: Path) -> list[Item]:
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    return [Item(_absolute(p), p.relative_to(root).as_posix()) for p in files]


def _table(path: Path, path_column: str, label_column: str, id_column: str) -> list[Item]:
    columns = _read_table(path)
    if path_column not in columns:
        raise BatchError(
            f"{path} has no column {path_column!r} (columns: {', '.join(columns)}); name the "
            "image path column 'path' or pass path_column= (CLI: --path-column)"
        )
    present = [c for c in BOX_COLUMNS if c in columns]
    if present and len(present) < 4:
        raise BatchError(
            f"{path} has box column(s) {present} but not all of {', '.join(BOX_COLUMNS)}"
        )
    base = path.parent
    items = []
    for i, written in enumerate(columns[path_column]):
        if written is None or str(written).strip() == "":
            items.append(Item("", f"row {i + 1}", problem=f"row {i + 1} of {path} has no path"))
            continue
        written = str(written)
        full = _absolute(base / written)  # an absolute `written` replaces `base`
        ids = columns.get(id_column)
        image_id = str(ids[i]) if ids is not None and ids[i] is not None else written
        label = _blank_to_none(columns[label_column][i]) if label_column in columns else None
        box, problem = _box([columns[c][i] for c in BOX_COLUMNS]) if present else (None, None)
        items.append(Item(full, image_id, None, box, problem, label))
    return items


def _read_table(path: Path) -> dict[str, list[Any]]:
    """Columns of a CSV or Parquet file as Python lists."""
    try:
        if path.suffix.lower() == ".csv":
            from pyarrow import csv

            table = csv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for malformed files
        raise BatchError(f"cannot read the table {path}: {e}") from e
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _box(values: list[Any]) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """(box, None), (None, None) when the row has no box, or (None, problem)."""
    values = [_blank_to_none(v) for v in values]
    if all(v is None for v in values):
        return None, None
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None, f"box {values} is not four numbers x0, y0, x1, y1"
    x0, y0, x1, y1 = numbers
    if not all(math.isfinite(v) for v in numbers) or x1 <= x0 or y1 <= y0:
        return None, f"box {list(numbers)} is empty or not finite (it needs x0 < x1, y0 < y1)"
    return numbers, None  # type: ignore[return-value]


def _absolute(path: str | Path) -> str:
    """Absolute paths, so that workers started elsewhere (a Ray cluster) find the files."""
    return os.path.abspath(path)


def _blank_to_none(value: Any) -> Any:
    """Empty cells of a CSV column read as text are missing values."""
    return None if isinstance(value, str) and not value.strip() else value


def _check_unique(items: list[Item]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.image_id in seen:
            raise BatchError(
                f"image id {item.image_id!r} appears twice; each row needs its own path (or "
                "its own value in the 'id' column), so that resuming knows what is done"
            )
        seen.add(item.image_id)


def resolve_labels(items: list[Item], labels: Sequence[str]) -> list[Item]:
    """Table labels (class ids or names) as class ids of the model; a label that names no
    class becomes the item's problem."""
    resolved = []
    for item in items:
        if item.raw_label is None or item.problem is not None:
            resolved.append(item)
            continue
        try:
            class_id = class_id_of(item.raw_label, labels)
            if not 0 <= class_id < len(labels):
                raise TargetError(f"label {class_id} is not one of the model's {len(labels)}")
        except TargetError as e:
            resolved.append(replace(item, problem=f"label {item.raw_label!r}: {e}"))
            continue
        resolved.append(replace(item, label=class_id))
    return resolved
