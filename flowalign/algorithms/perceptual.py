"""Perceptual distances for DMD's regression term: LPIPS's form over a frozen network's features.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", Eq. 1):

    d(x, y) = sum_l  1 / (H_l W_l)  sum_{h, w}  || w_l * (f^l_hw(x) / |f^l_hw(x)| - f^l_hw(y) / |f^l_hw(y)|) ||^2

the features ``f^l`` of layer ``l`` unit-normalised over channels at each position, their difference scaled per
channel by ``w_l``, squared, summed over channels, averaged over space and summed over layers. DMD (Yin et al.
2024, Sec. 3.3) regresses its one-step student on the teacher's ODE samples with LPIPS on a VGG trained on
ImageNet: ``lpips`` here (the ``lpips`` package, LPIPS v0.1 over VGG16 with its learned channel weights; the VGG
weights come from torchvision's download cache). They cannot be downloaded on an offline machine, and an ImageNet
network is a poor judge of 32x32 scenes of flat shapes anyway, so the shapes world's stand-in, ``shapes_lpips``, is
the same form over the image encoder of its own perception network, ``shapes_match`` (``rewards/shapes_match.py``,
trained to tell whether a scene matches a prompt), with unit channel weights: LPIPS's "baseline" variant, without
the linear layers it fits to human judgements (there are no human judgements of this world to fit them to).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

PERCEPTUAL_DISTANCES = ("lpips", "shapes_lpips")


def lpips_form(features_x: list[Tensor], features_y: list[Tensor], eps: float = 1e-10) -> Tensor:
    """Zhang et al.'s Eq. 1 with unit channel weights: ``[B, C_l, H_l, W_l]`` features of each layer of two
    batches -> their distances ``[B]``. A position whose features are all zero normalises to zero (``eps``, as
    LPIPS's ``normalize_tensor``), without a division by zero in the gradient."""
    total = 0.0
    for a, b in zip(features_x, features_y, strict=True):
        a = a * torch.rsqrt(a.pow(2).sum(dim=1, keepdim=True) + eps**2)
        b = b * torch.rsqrt(b.pow(2).sum(dim=1, keepdim=True) + eps**2)
        total = total + (a - b).pow(2).sum(dim=1).mean(dim=(-2, -1))
    return total


class ShapesLPIPS(nn.Module):
    """LPIPS's form over the three convolutions of ``shapes_match``'s image encoder (after each activation, and
    the last convolution's output: 16x16x32, 8x8x64 and 8x8x64 features of a 32x32 image), frozen.

    ``forward(x, y)`` takes images ``[B, 3, 32, 32]`` in [0, 1] (values slightly outside are kept: the
    regression's gradient should not vanish where a student overshoots) and returns ``[B]`` distances.
    """

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from rewards.shapes_match import DEFAULT_WEIGHTS, load_match_model

        self.cnn = load_match_model(DEFAULT_WEIGHTS if weights_path is None else weights_path).cnn
        self.requires_grad_(False).eval()

    def features(self, images: Tensor) -> list[Tensor]:
        x, taps = images * 2 - 1, []
        for i, layer in enumerate(self.cnn):
            x = layer(x)
            if isinstance(layer, nn.GELU) or i == len(self.cnn) - 1:
                taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        dtype = next(self.cnn.parameters()).dtype
        return lpips_form(self.features(x.to(dtype)), self.features(y.to(dtype)))


class VGGLPIPS(nn.Module):
    """DMD's distance: LPIPS v0.1 over VGG16 with Zhang et al.'s learned channel weights (the ``lpips``
    package, ``pip install 'flowalign[lpips]'``), frozen. ``forward(x, y)``: images ``[B, 3, H, W]`` in [0, 1]
    -> ``[B]`` distances.

    The VGG16 ImageNet weights are torchvision's (``torch.hub.get_dir()/checkpoints``), downloaded on first use;
    with ``HF_HUB_OFFLINE=1`` (the project's offline switch) nothing is downloaded and a missing file is an
    error naming ``option``. ``pretrained_backbone=False`` takes a random VGG16 instead (tests)."""

    def __init__(self, option: str = "dmd.regression_loss", pretrained_backbone: bool = True):
        super().__init__()
        try:
            import lpips
        except ImportError:
            raise ImportError(
                f"{option}=lpips needs the lpips package: pip install 'flowalign[lpips]' (or use shapes_lpips / mse)"
            ) from None
        from torchvision.models import VGG16_Weights

        url = VGG16_Weights.IMAGENET1K_V1.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        fix = f"put {url} at {cached}, or set {option}=mse"
        if pretrained_backbone and not cached.is_file() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"{option}=lpips: the VGG16 weights are not at {cached} and HF_HUB_OFFLINE=1; {fix}"
            )
        try:
            # the package asks torchvision for `pretrained=`, deprecated there
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained_backbone, verbose=False)
        except OSError as error:  # a failed download (URLError is an OSError)
            raise OSError(
                f"{option}=lpips: the VGG16 weights could not be downloaded ({error}); {fix}"
            ) from None
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x.float(), y.float(), normalize=True).view(-1)


def load_perceptual(name: str, option: str = "dmd.regression_loss") -> nn.Module:
    """The perceptual distance ``name`` (one of :data:`PERCEPTUAL_DISTANCES`); ``option`` names the key that chose
    it in errors."""
    if name == "shapes_lpips":
        return ShapesLPIPS()
    if name == "lpips":
        return VGGLPIPS(option)
    raise ValueError(
        f"{option}: unknown perceptual distance {name!r}; choose mse or one of {', '.join(PERCEPTUAL_DISTANCES)}"
    )
