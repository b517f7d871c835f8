"""The output folder of a batch run: Parquet tables and compressed arrays written part by
part, each part committed by a manifest entry written last.

```
OUT/run.json                      the settings (a resumed run must use the same)
OUT/rows/part-000000.parquet      image × method × target: scores, metrics, array reference
OUT/predictions/part-….parquet    top-k per image
OUT/errors/part-….parquet         images that could not be explained, and why
OUT/arrays/part-….npz             the maps, one array per method (rows × C × h × w)
OUT/manifest/part-….json          written last: the part is complete
```

Every file is written under a temporary name in OUT/.tmp and renamed into place, so a
killed run never leaves a half-written file under a final name; a part whose manifest
entry is missing is deleted and redone when the run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnscan.errors import BatchError

TABLES = ("rows", "predictions", "errors")
_DIRS = (*TABLES, "arrays", "manifest")
_SUFFIX = {"rows": ".parquet", "predictions": ".parquet", "errors": ".parquet", "arrays": ".npz"}
# Settings that change what is computed: a resumed run must use the same ones.
RESULT_SETTINGS = (
    "model",
    "classes",
    "methods",
    "options",
    "layer",
    "targets",
    "top_k",
    "resolution",
    "dtype",
    "metrics",
)


def _schemas(metric_columns: Sequence[str]) -> dict[str, Any]:
    import pyarrow as pa

    text, integer, number = pa.string(), pa.int64(), pa.float64()
    rows = [
        ("path", text),
        ("image_id", text),
        ("method", text),
        ("layer", text),
        ("target_rank", pa.int32()),
        ("target", integer),
        ("target_name", text),
        ("label", integer),
        ("probability", number),
        ("score", number),
        ("array_file", text),
        ("array_key", text),
        ("array_index", pa.int32()),
        *((name, number) for name in metric_columns),
    ]
    predictions = [
        ("path", text),
        ("image_id", text),
        ("rank", pa.int32()),
        ("class_id", integer),
        ("class_name", text),
        ("probability", number),
        ("logit", number),
        ("label", integer),
    ]
    errors = [("path", text), ("image_id", text), ("stage", text), ("reason", text)]
    return {
        "rows": pa.schema(rows),
        "predictions": pa.schema(predictions),
        "errors": pa.schema(errors),
    }


@dataclass
class Part:
    """Everything computed for one part of the input: table columns and maps per method."""

    number: int
    image_ids: list[str]
    rows: dict[str, list] = field(default_factory=dict)
    predictions: dict[str, list] = field(default_factory=dict)
    errors: dict[str, list] = field(default_factory=lambda: {k: [] for k in _ERROR_COLUMNS})
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"part-{self.number:06d}"

    def add_error(self, path: str, image_id: str, stage: str, reason: str) -> None:
        for key, value in zip(_ERROR_COLUMNS, (path, image_id, stage, reason), strict=True):
            self.errors[key].append(value)


_ERROR_COLUMNS = ("path", "image_id", "stage", "reason")


class Store:
    """One run's output folder: what is done, and atomic commits of new parts."""

    def __init__(self, out: str | Path, metric_columns: Sequence[str] = ()):
        self.out = Path(out)
        self.metric_columns = list(metric_columns)
        self.schemas = _schemas(self.metric_columns)
        self._lock: Any = None
        self._opened = False  # the folder is this run's (locked where the OS can lock)

    # -- opening and resuming -----------------------------------------------------------
    def open(self, settings: dict[str, Any]) -> set[str]:
        """Create or resume the folder: check the settings match, remove what a killed run
        left uncommitted, and return the ids of the images already done."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._opened = True
        saved = self.out / "run.json"
        started = any((self.out / "manifest").glob("part-*.json"))
        if saved.exists() and started:
            previous = json.loads(saved.read_text())
            changed = [k for k in RESULT_SETTINGS if previous.get(k) != settings.get(k)]
            if changed:
                details = "; ".join(
                    f"{k}: {previous.get(k)!r} before, {settings.get(k)!r} now" for k in changed
                )
                raise BatchError(
                    f"{self.out} holds a run with other settings ({details}); use another "
                    "--out folder, or the same settings to resume it"
                )
        else:  # a new run, or one that committed nothing: these settings are the run's
            self._write_bytes(saved, json.dumps(settings, indent=2).encode())
        for name in _DIRS:
            (self.out / name).mkdir(exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        done: set[str] = set()
        self.committed: set[int] = set()
        for number, entry in self.manifest():
            self.committed.add(number)
            done.update(entry["images"])
        for name in _DIRS:
            for path in (self.out / name).glob("part-*"):
                if _part_number(path) not in self.committed:
                    path.unlink()  # written by a run killed before it committed the part
        self.next_number = max(self.committed, default=-1) + 1
        return done

    @property
    def tmp(self) -> Path:
        return self.out / ".tmp"

    def _take_lock(self) -> None:
        """One run per folder at a time (released by the OS even when the run is killed)."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the user must not run twice
            return
        handle = (self.out / ".lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            raise BatchError(f"{self.out} is in use by another batch run; wait for it") from e
        self._lock = handle

    def close(self) -> None:
        """Remove the temporary files and release the folder, if this run opened it: a run
        that was refused (the folder in use) must not touch the other run's files."""
        if not self._opened:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._opened = False

    def manifest(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(part number, manifest entry) of every committed part, in order."""
        for path in sorted((self.out / "manifest").glob("part-*.json")):
            yield _part_number(path), json.loads(path.read_text())

    # -- committing -----------------------------------------------------------------------
    def commit(self, part: Part) -> None:
        """Write the part's files, then its manifest entry (the commit)."""
        import pyarrow as pa

        arrays = {key: np.stack(values) for key, values in part.arrays.items()}
        buffer = self.tmp / f"{part.name}.npz"
        with buffer.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(buffer, self.out / "arrays" / f"{part.name}.npz")
        for table in TABLES:
            columns = getattr(part, table)
            schema = self.schemas[table]
            data = pa.Table.from_pydict(
                {name: columns.get(name, []) for name in schema.names}, schema=schema
            )
            self._write_parquet(data, self.out / table / f"{part.name}.parquet")
        entry = {
            "part": part.number,
            "images": part.image_ids,
            "rows": len(part.rows.get("path", [])),
            "errors": len(part.errors["path"]),
        }
        self._write_bytes(self.out / "manifest" / f"{part.name}.json", json.dumps(entry).encode())

    def _write_parquet(self, table: Any, final: Path) -> None:
        import pyarrow.parquet as pq

        buffer = self.tmp / final.name
        pq.write_table(table, buffer, compression="zstd")
        os.replace(buffer, final)

    def _write_bytes(self, final: Path, data: bytes) -> None:
        buffer = (self.tmp if self.tmp.exists() else final.parent) / f".{final.name}.partial"
        buffer.write_bytes(data)
        os.replace(buffer, final)


def _part_number(path: Path) -> int:
    return int(path.name.split(".")[0].removeprefix("part-"))


class Results:
    """Read a batch run's output (committed parts only): tables as pyarrow Tables (call
    `.to_pandas()` for a DataFrame) and the map of any row."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if not (self.out / "run.json").exists():
            raise BatchError(f"{self.out} is not the output folder of a batch run (no run.json)")
        self.settings = json.loads((self.out / "run.json").read_text())
        self._cached: tuple[tuple[str, str], np.ndarray] | None = None

    def parts(self) -> list[str]:
        return [f"part-{n:06d}" for n, _ in Store(self.out).manifest()]

    def table(self, name: str, columns: Sequence[str] | None = None) -> Any:
        """One of `TABLES` over all committed parts (optionally only some columns)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if name not in TABLES:
            raise BatchError(f"no table {name!r}; tables: {', '.join(TABLES)}")
        pieces = [
            pq.read_table(self.out / name / f"{part}.parquet", columns=columns)
            for part in self.parts()
        ]
        if not pieces:
            schema = _schemas(self.settings.get("metric_columns", []))[name]
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(pieces)

    def rows(self) -> Any:
        return self.table("rows")

    def predictions(self) -> Any:
        return self.table("predictions")

    def errors(self) -> Any:
        return self.table("errors")

    def array(self, row: dict[str, Any] | Any) -> np.ndarray:
        """The map (C, h, w) a row refers to (a dict, pandas row or anything indexable by
        'array_file', 'array_key', 'array_index'). The last array read is kept, so going
        through the rows in table order decompresses each array once."""
        key = (row["array_file"], row["array_key"])
        if self._cached is None or self._cached[0] != key:
            with np.load(self.out / key[0]) as data:
                self._cached = (key, data[key[1]])
        return self._cached[1][int(row["array_index"])].copy()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())
