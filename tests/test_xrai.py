"""XRAI: PAIR saliency 0.2.1's regions (the same Felzenszwalb masks), the same greedy
ranking and gains as PAIR's XRAI given the same attribution and regions, and close to PAIR's
XRAI end to end on random-weight resnet18."""

from __future__ import annotations

import numpy as np
import pytest
import saliency.core as pair
import torch
import torchvision
from helpers import pair_gradients, pearson
from saliency.core.xrai import _get_segments_felzenszwalb

import cnnscan
from cnnscan.errors import MethodError
from cnnscan.methods.superpixels import felzenszwalb_masks
from cnnscan.methods.xrai import xrai_regions


def picture(size: int, seed: int) -> np.ndarray:
    """A smooth random picture (H, W, 3): blobs, so that the segments have shapes."""
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic")
    return up[0].permute(1, 2, 0).double().numpy()


def test_the_regions_are_pairs():
    image = picture(48, 0)
    theirs = np.stack(_get_segments_felzenszwalb(image))
    assert torch.equal(felzenszwalb_masks(image), torch.from_numpy(theirs))


@pytest.mark.parametrize(("area", "min_pixels"), [(1.0, 50), (0.4, 20), (1.0, 1)])
def test_ranking_equals_pair_given_the_same_attribution_and_regions(area, min_pixels):
    image = picture(48, 1)
    segments = _get_segments_felzenszwalb(image)
    attr = np.random.RandomState(2).randn(*image.shape)
    options = pair.XRAIParameters(area_threshold=area, return_xrai_segments=True)
    options.experimental_params["min_pixel_diff"] = min_pixels
    theirs = pair.XRAI().GetMaskWithDetails(
        image, None, segments=segments, base_attribution=attr, extra_parameters=options
    )
    values, ranks = xrai_regions(
        torch.from_numpy(attr).amax(dim=2), torch.from_numpy(np.stack(segments)), area, min_pixels
    )
    assert torch.equal(ranks, torch.from_numpy(theirs.segments))
    torch.testing.assert_close(
        values, torch.from_numpy(theirs.attribution_mask), rtol=1e-12, atol=0
    )


def test_xrai_close_to_pair_saliency_end_to_end():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.from_numpy(picture(64, 3)).permute(2, 0, 1)[None].float()
    ours = cnnscan.explain(net, x, "xrai", targets=[3], n_steps=16).maps[0, 0, 0]
    theirs = pair.XRAI().GetMask(
        x[0].permute(1, 2, 0).numpy(),
        pair_gradients(net, 3),
        batch_size=16,
        extra_parameters=pair.XRAIParameters(steps=16),
    )
    assert pearson(ours, torch.from_numpy(theirs)) > 0.99


def test_bad_options_are_refused():
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(MethodError, match="area_threshold"):
        cnnscan.explain(net, x, "xrai", area_threshold=2)
    with pytest.raises(MethodError, match="regions"):
        cnnscan.explain(net, x, "xrai", regions=torch.zeros(4, 32, 32))
