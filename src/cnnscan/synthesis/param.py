"""Image parameterizations: the tensors an optimizer changes, and how they become pixels.

`fft`: a 2-D Fourier spectrum scaled by 1/frequency, so that steps change the image at all
scales evenly instead of adding high-frequency noise (lucid/lucent). `pixel`: the pixels
themselves. With `decorrelate=True` the three channels are mixed by the square root of
ImageNet's colour correlation, so the optimizer works on decorrelated colours. A sigmoid
maps the result into [0, 1].
"""

from __future__ import annotations

import torch

from cnnscan.errors import MethodError

# sqrt of ImageNet's RGB colour covariance (lucid/lucent), columns scaled to unit max norm.
COLOR_CORRELATION_SVD_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
)
COLOR_CORRELATION = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()

_FFT_MAGIC = 4.0  # lucid's divisor for the Fourier image: less saturated colours


def fft_scale(height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """1 / max(|f|, 1 / max(h, w))^decay for each frequency of `rfft2` of an (h, w) image."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freqs = (fx.square() + fy.square()).sqrt()
    return (1.0 / freqs.clamp_min(1.0 / max(height, width)) ** decay_power).float()


class FourierImage:
    """Unbounded (B, C, H, W) values from a learnable spectrum (B, C, H, W//2+1, 2)."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        sd: float = 0.01,
        decay_power: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ):
        batch, channels, self.height, self.width = shape
        self.scale = fft_scale(self.height, self.width, decay_power).to(device)
        noise = torch.randn((batch, channels, *self.scale.shape, 2), generator=generator)
        self.spectrum = (noise * sd).to(device).requires_grad_(True)

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [self.spectrum]

    def __call__(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfftn(spectrum, s=(self.height, self.width), norm="ortho")
        return image / _FFT_MAGIC

    @torch.no_grad()
    def set(self, values: torch.Tensor) -> None:
        """Make `self()` return `values` (B, C, H, W)."""
        spectrum = torch.fft.rfftn(values * _FFT_MAGIC, s=(self.height, self.width), norm="ortho")
        self.spectrum.copy_(torch.view_as_real(spectrum / self.scale))


class PixelImage:
    """Unbounded (B, C, H, W) values, one learnable number per pixel and channel."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        sd: float = 0.01,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ):
        self.values = (torch.randn(shape, generator=generator) * sd).to(device).requires_grad_(True)

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [self.values]

    def __call__(self) -> torch.Tensor:
        return self.values

    @torch.no_grad()
    def set(self, values: torch.Tensor) -> None:
        self.values.copy_(values)


def decorrelate_colors(x: torch.Tensor) -> torch.Tensor:
    """Mix decorrelated colour components (B, 3, H, W) into RGB: out_d = Σ_c M[d, c] x_c."""
    return torch.einsum("dc,bchw->bdhw", COLOR_CORRELATION.to(x), x)


def correlate_colors(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `decorrelate_colors`."""
    return torch.einsum("dc,bchw->bdhw", torch.linalg.inv(COLOR_CORRELATION.double()).to(x), x)


class ImageParam:
    """A learnable image: `parameters` for the optimizer, `()` gives pixels (B, 3, H, W)
    in [0, 1]. `set_pixels` starts it from a picture instead of noise."""

    def __init__(self, spatial: FourierImage | PixelImage, decorrelate: bool = True):
        self.spatial = spatial
        self.decorrelate = decorrelate

    @property
    def parameters(self) -> list[torch.Tensor]:
        return self.spatial.parameters

    def __call__(self) -> torch.Tensor:
        values = self.spatial()
        if self.decorrelate:
            values = decorrelate_colors(values)
        return torch.sigmoid(values)

    def set_pixels(self, pixels: torch.Tensor, eps: float = 1e-3) -> None:
        """Start from `pixels` in [0, 1] (clamped to [eps, 1 − eps], where the sigmoid is
        invertible)."""
        values = torch.logit(pixels.clamp(eps, 1 - eps))
        if self.decorrelate:
            values = correlate_colors(values)
        self.spatial.set(values)


PARAMS = ("fft", "pixel")


def image_param(
    kind: str,
    shape: tuple[int, int, int, int],
    *,
    decorrelate: bool = True,
    sd: float = 0.01,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> ImageParam:
    """An `ImageParam` of kind "fft" or "pixel", initialized with N(0, sd²) noise."""
    if kind == "fft":
        spatial = FourierImage(shape, sd=sd, generator=generator, device=device)
    elif kind == "pixel":
        spatial = PixelImage(shape, sd=sd, generator=generator, device=device)
    else:
        raise MethodError(f"unknown image parameterization {kind!r}; use one of {PARAMS}")
    return ImageParam(spatial, decorrelate)
