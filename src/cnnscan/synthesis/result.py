"""`Synthesis`: a synthesized image (or batch), how the objective rose, and how it was made."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnscan.render import png_bytes, tile_grid


@dataclass
class Synthesis:
    """`pixels` (B, 3, H, W) in [0, 1] on the CPU; `history` the objective at each step
    (on that step's transformed image); `initial` / `final` the objective on the start and
    end images without transforms; `settings` everything needed to reproduce the run."""

    pixels: torch.Tensor
    history: list[float]
    initial: float
    final: float
    objective: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images(self) -> list[np.ndarray]:
        """Every image of the batch as uint8 (H, W, 3)."""
        rgb = (self.pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        return [image.permute(1, 2, 0).numpy() for image in rgb]

    @property
    def image(self) -> np.ndarray:
        """The first image as uint8 (H, W, 3)."""
        return self.images[0]

    def _repr_png_(self) -> bytes:  # Jupyter shows the image(s), side by side
        images = self.images
        return png_bytes(images[0] if len(images) == 1 else tile_grid(np.stack(images)))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: objective, values, settings, timing and the history."""
        return {
            "objective": self.objective,
            "initial": self.initial,
            "final": self.final,
            "steps": len(self.history),
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            "history": self.history,
        }

    def save(self, out: str | Path, stem: str | None = None) -> list[Path]:
        """Write `STEM.png` (or `STEM-K.png` per image of a batch) and `STEM.json`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.@-]+", "_", stem or self.objective).strip("_") or "synthesis"
        images = self.images
        written = []
        for k, image in enumerate(images):
            path = out / (f"{stem}.png" if len(images) == 1 else f"{stem}-{k}.png")
            path.write_bytes(png_bytes(image))
            written.append(path)
        path = out / f"{stem}.json"
        path.write_text(json.dumps(self.summary(), indent=1))
        written.append(path)
        return written
