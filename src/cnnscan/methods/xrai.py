"""Gradient family, XRAI: image regions ranked by their density of Integrated Gradients
attribution, added greedily so that each region counts only the pixels not yet covered."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cnnscan.errors import MethodError
from cnnscan.methods.options import count, number
from cnnscan.methods.registry import MethodResult, get_method, register
from cnnscan.methods.superpixels import felzenszwalb_masks

if TYPE_CHECKING:
    from cnnscan.scan import Scan


def xrai_regions(
    attr: torch.Tensor, masks: torch.Tensor, area_threshold: float = 1.0, min_pixel_diff: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAIR saliency 0.2.1's XRAI ("full") on an attribution map (H, W) and region masks
    (M, H, W): until `area_threshold` of the image is covered, add the region whose pixels
    not yet covered have the highest mean attribution, dropping regions that would add fewer
    than `min_pixel_diff` pixels. Returns each pixel's value (its region's gain; the pixels
    left over get their mean) and rank (1 = best gain; the leftover pixels last), both (H, W).

    Each region's count and sum of uncovered attribution are kept up to date by subtracting
    the pixels each pick covers, so the whole run reads every mask pixel about once."""
    flat = masks.flatten(1)
    values = attr.flatten().double()
    total = len(values)
    counts = flat.sum(dim=1).double()
    sums = torch.cat([chunk.double() @ values for chunk in flat.split(64)])
    alive = torch.ones(len(flat), dtype=torch.bool)
    pick = torch.full((total,), -1, dtype=torch.long)
    gains: list[float] = []
    covered = 0
    while covered / total <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not bool(alive.any()):
            break
        best = int(torch.where(alive, sums / counts, -torch.inf).argmax())
        new = (flat[best] & (pick < 0)).nonzero().squeeze(1)
        pick[new] = len(gains)
        gains.append(float(values[new].mean()))
        covered += len(new)
        part = flat[:, new]
        counts -= part.sum(dim=1)
        sums -= part.double() @ values[new]
        alive[best] = False
    left = pick < 0
    leftover = float(values[left].mean()) if bool(left.any()) else 0.0
    gain = torch.tensor([*gains, leftover], dtype=torch.float64)
    order = torch.sort(-gain[:-1], stable=True).indices
    rank = torch.empty(len(gain), dtype=torch.long)
    rank[order] = torch.arange(1, len(order) + 1)
    rank[-1] = len(order) + 1
    shape = attr.shape
    return gain[pick].view(shape), rank[pick].view(shape)


def _given_masks(scan: Scan, regions: torch.Tensor | None) -> list[torch.Tensor] | None:
    """The user's region masks per input, from boolean masks (M, H, W) shared by every input
    or (N, M, H, W); None when XRAI makes its own."""
    if regions is None:
        return None
    n, _, height, width = scan.inputs.shape
    given = torch.as_tensor(regions)
    if given.dtype != torch.bool or given.ndim not in (3, 4) or given.shape[-2:] != (height, width):
        raise MethodError(
            f"regions must be boolean region masks (M, {height}, {width}) or "
            f"({n}, M, {height}, {width}), got {given.dtype} {tuple(given.shape)}"
        )
    if given.ndim == 4 and len(given) != n:
        raise MethodError(f"regions holds masks for {len(given)} images, the call has {n}")
    return [given.cpu()] * n if given.ndim == 3 else list(given.cpu())


@register(
    "xrai",
    family="gradient",
    description="XRAI: overlapping image regions (Felzenszwalb at six scales) added greedily "
    "by their density of Integrated Gradients attribution; each pixel gets its region's gain.",
    cost="2 × n_steps forwards + backwards per target, and a segmentation per image",
    paper="Kapishnikov et al. 2019, arXiv:1906.02825",
    in_default_scan=False,
)
def xrai(
    scan: Scan,
    targets: torch.Tensor,
    *,
    n_steps: int = 50,
    regions: torch.Tensor | None = None,
    area_threshold: float = 1.0,
    min_pixel_diff: int = 50,
) -> MethodResult:
    """PAIR saliency 0.2.1's XRAI: IG (`integrated_gradients`, `n_steps`) from a black and a
    white baseline (each input's minimum and maximum value), averaged, the channels' maximum
    taken, then the greedy regions of `xrai_regions` (`regions`: the user's own boolean
    region masks instead of Felzenszwalb's; not `segments`, which perturbation methods take as
    a count or a label map). Maps (N, T, 1, H, W); the ranks of the
    regions (1 = most important) in `extras["ranks"]` (N, T, H, W)."""
    area_threshold = number("area_threshold", area_threshold)
    if area_threshold > 1:
        raise MethodError(f"area_threshold must be in [0, 1], got {area_threshold!r}")
    min_pixel_diff = count("min_pixel_diff", min_pixel_diff)
    given = _given_masks(scan, regions)
    inputs = scan.inputs
    ig = get_method("integrated_gradients").fn
    extremes = (inputs.amin(dim=(1, 2, 3)), inputs.amax(dim=(1, 2, 3)))
    black, white = (e.view(-1, 1, 1, 1).expand_as(inputs) for e in extremes)
    both = [ig(scan, targets, n_steps=n_steps, baseline=b).maps for b in (black, white)]
    attr = ((both[0] + both[1]) / 2).amax(dim=2).cpu()
    maps = torch.empty(attr.shape, dtype=torch.float64)
    ranks = torch.empty(attr.shape, dtype=torch.long)
    pictures = inputs.detach().permute(0, 2, 3, 1).cpu().numpy()  # PAIR segments model input
    regions = given or [felzenszwalb_masks(picture) for picture in pictures]
    for image, masks in enumerate(regions):
        for column in range(targets.shape[1]):
            maps[image, column], ranks[image, column] = xrai_regions(
                attr[image, column], masks, area_threshold, min_pixel_diff
            )
    extras = {"ranks": ranks, "n_steps": n_steps, "area_threshold": area_threshold}
    return MethodResult(maps.unsqueeze(2).to(inputs.device, inputs.dtype), extras)
