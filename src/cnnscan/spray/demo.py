"""A Clever-Hans model and data set, built in code: the audit's demonstration (its test and
the docs page run it). A hand-built net calls a picture "horse" for a green disc and, much
more strongly, for a red stamp in the top-left corner; half of the horses carry the stamp,
and so do half of the other pictures, which the model then calls horses too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cnnscan.models import Model, load_model
from cnnscan.models.preprocessing import Preprocessing


def clever_hans_model() -> Model:
    """A hand-built two-class net on 32×32 pictures in [0, 1]: 1×1 detectors of red, green and
    blue pixels (pure colours only: the dim noisy background stays below their thresholds),
    averaged over the picture. Class 0 ("horse") reads green blobs, and, fifteen times more
    strongly per pixel, red: a 4×4 red stamp in a corner outweighs a blob. Class 1 reads
    blue."""
    net = nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)
    )
    with torch.no_grad():
        net[0].weight.copy_(
            torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]]).view(3, 3, 1, 1)
        )
        net[0].bias.fill_(-0.5)
        net[4].weight.copy_(torch.tensor([[1500.0, 100, 0], [0, 0, 100]]))
        net[4].bias.zero_()
    prep = Preprocessing(
        size=(32, 32), resize_shorter=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    )
    return load_model(net.eval(), preprocessing=prep, labels=["horse", "other"])


def clever_hans_images(root: Path, seed: int = 0) -> tuple[Path, dict[str, bool]]:
    """24 "horse" pictures (a green disc near the centre), half of them stamped with a red
    patch in the top-left corner, and 8 "other" pictures (a blue disc), half stamped (the
    model calls those horses). Returns a CSV table (path, label) and {path: stamped}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    stamped: dict[str, bool] = {}
    lines = ["path,label"]
    for i in range(32):
        label, stamp = (0, i % 2 == 0) if i < 24 else (1, i % 2 == 0)
        pixels = rng.uniform(0, 0.3, (32, 32, 3))
        cy, cx = rng.integers(10, 23, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        pixels[disc] = (0, 1, 0) if label == 0 else (0, 0, 1)
        if stamp:
            pixels[:4, :4] = (1, 0, 0)
        path = root / f"image_{i:02d}.png"
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
        stamped[str(path)] = stamp
        lines.append(f"{path},{label}")
    table = root / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    return table, stamped
