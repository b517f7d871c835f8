"""Downloads of a whole run: a zip of every cell (PNG as shown, NPY raw map, JSON summary)
and the library's self-contained HTML report built from the cells already computed."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnscan import render
from cnnscan.app.core import Column, Workspace, join_targets
from cnnscan.attribution import Attribution
from cnnscan.report import ScanResult, learned_pictures, write_report

Cells = Mapping[tuple[Column, int], Attribution]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def run_zip(
    workspace: Workspace,
    columns: Sequence[Column],
    targets: Sequence[int],
    cells: Cells,
    pngs: Mapping[tuple[Column, int], bytes],
    settings: dict | None = None,
) -> bytes:
    """`input.png`, `summary.json` (model, picture, targets with probabilities, columns
    with options and seconds, every cell's method numbers) and per column a folder with
    `class{ID}.png` (the picture shown) and `class{ID}.npy` (the raw signed map)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.png", render.png_bytes(np.asarray(workspace.view)))
        summary_cells = []
        for column in columns:
            for target in targets:
                attr = cells[(column, target)]
                stem = f"{column.file_stem}/class{target}"
                archive.writestr(f"{stem}.png", pngs[(column, target)])
                archive.writestr(f"{stem}.npy", _npy(attr.maps[0, 0].detach().cpu().numpy()))
                summary_cells.append({"column": column.title, "file": stem, **attr.summary()})
        summary = {
            "model": workspace.model.name,
            "image": workspace.picture.name,
            "targets": workspace.prediction_rows(targets),
            "columns": [
                {
                    "title": c.title,
                    "method": c.method,
                    "layer": c.layer,
                    "options": c.option_values(),
                    "seconds": workspace.seconds(c),
                }
                for c in columns
            ],
            "view": settings or {},
            "cells": summary_cells,
        }
        archive.writestr("summary.json", json.dumps(summary, indent=1))
    return buffer.getvalue()


def report_html(
    workspace: Workspace,
    columns: Sequence[Column],
    targets: Sequence[int],
    cells: Cells,
    leaderboard: tuple[list[dict[str, Any]], dict[str, Any]] | None = None,
) -> bytes:
    """The HTML report (`cnnscan.report.write_report`) of this run: the chosen targets as
    rows, one column per method (its first layer), the layer table, what the network
    learned and the receptive fields, and the leaderboard of the first target when the page
    has computed it ((rows, options)). Only the learned section's pictures are new work."""
    attributions: dict[str, Attribution] = {}
    for column in columns:
        if column.method not in attributions:
            attributions[column.method] = join_targets([cells[(column, t)] for t in targets])
    with workspace.lock:
        rows = workspace.layer_rows()
        result = ScanResult(
            model=workspace.model,
            image_name=workspace.picture.name,
            view=np.asarray(workspace.view),
            preprocessing=workspace.model.preprocessing.describe(origin=True),
            predictions=workspace.prediction_rows(targets),
            attributions=attributions,
            seconds={c.method: workspace.seconds(c) for c in columns},
            layers=rows,
            learned=learned_pictures(workspace.scan, rows),
            receptive=workspace.receptive_fields(),
        )
        if leaderboard is not None:
            result.leaderboard, result.leaderboard_options = leaderboard
        with tempfile.TemporaryDirectory(prefix="cnnscan-app-") as folder:
            return write_report(result, Path(folder)).read_bytes()
