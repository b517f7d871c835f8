"""`Attribution`: what an explanation method returns, with views and export helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnscan import render
from cnnscan.models.preprocessing import Preprocessing


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (N, T, C, h, w) resized to `size` with bilinear interpolation (no corner
    alignment, as torchvision and the CAM libraries do); unchanged if already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    n, t, c, h, w = maps.shape
    flat = maps.reshape(n * t, c, h, w).float()
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.view(n, t, c, *size)


def minmax_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of (..., h, w) scaled to [0, 1]; a constant map becomes all zeros."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


@dataclass
class Attribution:
    """Raw signed maps (N images, T targets, C, h, w) at the method's native resolution.

    C = 3 for input-space methods, 1 for layer maps (CAMs). `inputs` are the model inputs
    the maps explain; `scores` the target logits; `extras` method-specific numbers (e.g. the
    completeness error of Integrated Gradients); `preprocessing` turns `inputs` back into
    the picture for overlays; `space` ("input" or "layer") and `default_view` (a kind of
    `cnnscan.render.VIEWS`) say how reports draw it (set from the method's registration; a
    hand-made Attribution with `space=None` counts as a layer map when it has one channel).
    In Jupyter an Attribution shows itself as a grid of its maps.
    """

    maps: torch.Tensor
    targets: torch.Tensor
    method: str
    inputs: torch.Tensor
    layer: str | None = None
    scores: torch.Tensor | None = None
    labels: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    space: str | None = None
    default_view: str = "heatmap"

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.inputs.shape[-2:])  # type: ignore[return-value]

    def upsample(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Maps resized (bilinear) to `size`, by default the input's: (N, T, C, H, W)."""
        return resize_maps(self.maps, size or self.input_size)

    def view(self, image: int = 0, target: int = 0, kind: str = "heatmap") -> torch.Tensor:
        """One map at input resolution as display values (see `cnnscan.render.view`)."""
        return render.view(self.full_map(image, target), kind)

    def full_map(self, image: int = 0, target: int = 0) -> torch.Tensor:
        """One raw map (C, H, W) at the input's resolution (bilinear, as `upsample`)."""
        one = self.maps[image : image + 1, target : target + 1]
        return resize_maps(one, self.input_size)[0, 0]

    def image(
        self,
        image: int = 0,
        target: int = 0,
        kind: str = "heatmap",
        *,
        background: np.ndarray | Image.Image | None = None,
        alpha: float = 0.5,
        cmap: str | None = None,
    ) -> np.ndarray:
        """A uint8 RGB picture of one map: an overlay on `background` if given."""
        values = self.view(image, target, kind)
        if background is not None and values.ndim == 2 and kind != "signed":
            return render.overlay(background, values, alpha=alpha, cmap=cmap or "jet")
        if kind == "signed":  # [-1, 1] -> [0, 1] here: a map without negatives stays centred
            return render.to_rgb((values + 1) / 2, cmap or render.DIVERGING)
        return render.to_rgb(values, cmap or render.SEQUENTIAL)

    def label(self, image: int = 0, target: int = 0) -> str:
        if "unit_layer" in self.extras:  # a layer unit, not a class (see `unit=`)
            return f"{self.extras['unit_layer']} channel {int(self.targets[image, target])}"
        class_id = int(self.targets[image, target])
        name = self.labels[class_id] if class_id < len(self.labels) else f"class {class_id}"
        return f"{class_id} {name}"

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: method, layer, targets, scores and scalar extras; a tensor
        extra is listed when it holds at most a value per image and target (completeness
        errors, steps), else named by its shape (maps such as a CAM's pre-ReLU `raw`)."""
        extras = {
            key: _summarized(value, self.targets.numel())
            for key, value in self.extras.items()
            if isinstance(value, str | int | float | bool | torch.Tensor)
        }
        return {
            "method": self.method,
            "layer": self.layer,
            "shape": list(self.maps.shape),
            "targets": self.targets.tolist(),
            "scores": self.scores.tolist() if self.scores is not None else None,
            "extras": extras,
        }

    def save(
        self, directory: str | Path, *, kind: str = "heatmap", overlay: bool = False
    ) -> list[Path]:
        """Write per image and target a PNG (the `kind` view) and an NPY (raw map), plus a
        JSON summary; with `overlay`, also `…_overlay.png`: the heat map over the picture the
        model saw, as reports draw CAMs. Returns the written paths."""
        from cnnscan.display import background

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        raw = self.maps.detach().cpu().numpy()
        subject = "unit" if "unit_layer" in self.extras else "class"
        for i in range(raw.shape[0]):
            photo = background(self, i) if overlay else None
            for t in range(raw.shape[1]):
                stem = directory / f"{self.method}_img{i}_{subject}{int(self.targets[i, t])}"
                np.save(stem.with_suffix(".npy"), raw[i, t])
                stem.with_suffix(".png").write_bytes(render.png_bytes(self.image(i, t, kind)))
                written += [stem.with_suffix(".npy"), stem.with_suffix(".png")]
                if photo is not None:
                    heat = self.image(i, t, "heatmap", background=photo)
                    path = stem.with_name(f"{stem.name}_overlay.png")
                    path.write_bytes(render.png_bytes(heat))
                    written.append(path)
        meta = directory / f"{self.method}.json"
        meta.write_text(json.dumps(self.summary(), indent=2))
        return [*written, meta]

    def _repr_png_(self) -> bytes:
        from cnnscan.display import attribution_png

        return attribution_png(self)

    def _repr_html_(self) -> str:
        from cnnscan.display import attribution_html

        return attribution_html(self)


def _summarized(value: Any, per_target: int) -> Any:
    """`value` as JSON: small tensors as lists, larger ones as "tensor (shape)"."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() <= per_target:
        return value.tolist()
    return f"tensor {tuple(value.shape)}"
