"""What a concept looks like: a synthesized image that excites its channel (cached on disk per
model, layer and channel, so a second call is free) and the patches of a folder of images
where it is most active and most relevant."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnscan.batch.inputs import Item
from cnnscan.concept.relevance import Propagation, layer_relevance
from cnnscan.concept.result import Patch
from cnnscan.engine.inference import cache_dir, model_key
from cnnscan.errors import ImageError
from cnnscan.images import load_image
from cnnscan.layers import ACTIVATION_MODULES, LayerRef, get_module
from cnnscan.models import Model
from cnnscan.render import png_bytes
from cnnscan.scan import Scan
from cnnscan.synthesis import channels as channels_objective
from cnnscan.synthesis import synthesize

PICTURE_STEPS = 64
PICTURE_SIZE = 128


def picture_layer(scan: Scan, layer: str) -> str:
    """The layer whose channels the pictures excite: `layer` itself, or for an elementwise
    activation the layer that feeds it (the call completed just before it, with the same
    shape), where a unit that is off or saturated still has a gradient (lucid's
    `*_pre_relu` layers)."""
    ref = LayerRef.parse(layer)
    if not isinstance(get_module(scan.model.module, ref.name), ACTIVATION_MODULES):
        return layer
    rows = scan.layer_table()
    names = [row.name for row in rows]
    if str(ref) not in names:
        return layer
    at = names.index(str(ref))
    before = rows[at - 1] if at > 0 else None
    if before is not None and before.output_shape == rows[at].output_shape:
        return before.name
    return layer


def feature_pictures(
    model: Model,
    layer: str,
    channels: Sequence[int],
    *,
    steps: int = PICTURE_STEPS,
    size: int = PICTURE_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """channel -> a synthesized image (uint8 (size, size, 3)) that excites it at `layer`.
    Pictures are kept under the cache folder (`$CNNSCAN_CACHE`, see
    `cnnscan.engine.inference.cache_dir`) keyed by the model's weights, the layer, the
    settings and the channel; the missing ones are drawn in one batched run."""
    folder = (
        cache_dir()
        / "concepts"
        / model_key(model.module, (steps, size, seed))
        / re.sub(r"[^A-Za-z0-9_.@-]+", "_", layer)
    )
    found: dict[int, np.ndarray] = {}
    for channel in dict.fromkeys(channels):
        path = folder / f"{channel}.png"
        if path.is_file():
            with contextlib.suppress(ImageError):  # a damaged file is drawn again
                found[channel] = np.asarray(load_image(path))
    missing = [c for c in dict.fromkeys(channels) if c not in found]
    if missing:
        drawn = synthesize(
            model,
            channels_objective(layer, missing),
            steps=steps,
            size=size,
            batch=len(missing),
            seed=seed,
            progress=progress,
        )
        folder.mkdir(parents=True, exist_ok=True)
        for channel, image in zip(missing, drawn.images, strict=True):
            _write(folder / f"{channel}.png", png_bytes(image))
            found[channel] = image
    return {c: found[c] for c in channels}


def _write(path: Path, data: bytes) -> None:
    """Write atomically: a reader never sees half a file."""
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
    partial.write_bytes(data)
    os.replace(partial, path)


@dataclass
class _Seen:
    """What one reference image showed at the layer, per asked channel (K,): largest and
    mean activation and where the largest is, relevance and where it peaks."""

    source: str
    pixels: np.ndarray
    act_max: torch.Tensor
    act_mean: torch.Tensor
    act_peak: torch.Tensor
    relevance: torch.Tensor
    rel_peak: torch.Tensor


def reference_patches(
    model: Model,
    items: Sequence[Item],
    layer: str,
    channels: Sequence[int],
    propagation: Propagation,
    *,
    count: int = 4,
    progress: Callable[[int, int], object] | None = None,
) -> dict[int, dict[str, list[Patch]]]:
    """channel -> {"activation": patches, "relevance": patches}: over `items` (the images
    of a folder, glob or table: `cnnscan.batch.inputs.discover`), the `count` images where
    the channel's largest activation is highest (ties, e.g. ReLU6 at 6, by the mean), and
    those where its relevance for the image's own top-1 class is highest, each cut to the
    region around the channel's peak at the layer (three layer cells wide). One image at a
    time: a forward, and the backward to the layer."""
    ids = torch.tensor(list(channels))
    seen: list[_Seen] = []
    grid = torch.Size()
    for done, item in enumerate(items, start=1):
        picture = np.asarray(model.view(item.path))
        pixels = torch.from_numpy(picture.copy()).permute(2, 0, 1)[None].float() / 255
        x = model.preprocessing.normalize(pixels).to(model.device)
        graph = propagation.composite is None  # LRP runs its own forward
        scan = Scan(model, x, layers=[layer], relu_rules=False, graph=graph)
        found = layer_relevance(scan, propagation, layer, scan.targets("top1")[0])
        grid = found.activations.shape[1:]
        acts = found.activations[ids].flatten(1)  # (K, h·w)
        relevance = found.relevance[0, ids].flatten(1)
        seen.append(
            _Seen(
                item.image_id,
                picture,
                acts.max(dim=1).values,
                acts.mean(dim=1),
                acts.argmax(dim=1),
                relevance.sum(dim=1),
                relevance.argmax(dim=1),
            )
        )
        if progress is not None:
            progress(done, len(items))
    result: dict[int, dict[str, list[Patch]]] = {}
    for k, channel in enumerate(channels):
        active = sorted(seen, key=lambda s: (-float(s.act_max[k]), -float(s.act_mean[k])))
        relevant = sorted(seen, key=lambda s: -float(s.relevance[k]))
        result[channel] = {
            "activation": [
                _patch(s, int(s.act_peak[k]), float(s.act_max[k]), grid) for s in active[:count]
            ],
            "relevance": [
                _patch(s, int(s.rel_peak[k]), float(s.relevance[k]), grid) for s in relevant[:count]
            ],
        }
    return result


def _patch(seen: _Seen, flat: int, value: float, grid: torch.Size) -> Patch:
    """The region of the picture around layer cell `flat` of an (h, w) grid."""
    pixels = seen.pixels
    height, width = pixels.shape[:2]
    h, w = grid
    cell_y, cell_x = height / h, width / w
    y, x = (flat // w + 0.5) * cell_y, (flat % w + 0.5) * cell_x
    half_y, half_x = 1.5 * cell_y, 1.5 * cell_x
    top, bottom = max(0, round(y - half_y)), min(height, round(y + half_y))
    left, right = max(0, round(x - half_x)), min(width, round(x + half_x))
    box = (left, top, right, bottom)
    return Patch(pixels[top:bottom, left:right].copy(), seen.source, box, value)
