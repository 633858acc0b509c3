"""2D descriptor network: the SuperPoint-derived U-Net of RNNPose (docs/method.md §2.1).

Sub-module names reproduce the published parameter keys (relative to
``hybrid_desc_net.corr_fea_extractor_2d.``): ``conv1a`` … ``conv4b``, ``decode{1,2,3}.1``,
``convPa.0``, ``convPb``, ``convDa``, ``convDb``. Every InstanceNorm is affine-free (eps 1e-5),
so norms own no parameters and no buffers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: The encoder halves the resolution three times and the decoder doubles it back.
SPATIAL_DIVISOR = 8


class Desc2DInputError(ValueError):
    """The image cannot go through the U-Net (wrong rank, channels or size)."""


class Desc2DOutput(NamedTuple):
    """Result of :class:`Desc2DNet`.

    ``descriptors``: (B, D, H, W) float32, unit L2 norm over D per pixel.
    ``scores``: (B, 1, H, W) float32 in (0, 1), or ``None`` when not requested.
    """

    descriptors: torch.Tensor
    scores: torch.Tensor | None


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def _decoder_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """×2 bilinear upsampling (align_corners=False) → 3×3 conv → InstanceNorm → ReLU.

    Index 1 is the conv, which gives the published key ``decodeN.1.*``.
    """
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        _conv3x3(in_channels, out_channels),
        nn.InstanceNorm2d(out_channels, affine=False, eps=1e-5),
        nn.ReLU(inplace=True),
    )


class Desc2DNet(nn.Module):
    """SuperPoint-style U-Net producing dense per-pixel descriptors (and optionally scores).

    Args:
        descriptor_dim: output descriptor channels D (32 in the published model).
        normalize_output: L2-normalise descriptors over channels (published: True).
    """

    def __init__(self, descriptor_dim: int = 32, normalize_output: bool = True) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = 64, 64, 128, 128, 256
        self.normalize_output = normalize_output
        self.conv1a = _conv3x3(3, c1)
        self.conv1b = _conv3x3(c1, c1)
        self.conv2a = _conv3x3(c1, c2)
        self.conv2b = _conv3x3(c2, c2)
        self.conv3a = _conv3x3(c2, c3)
        self.conv3b = _conv3x3(c3, c3)
        self.conv4a = _conv3x3(c3, c4)
        self.conv4b = _conv3x3(c4, c4)
        self.decode1 = _decoder_stage(c4, c4)
        self.decode2 = _decoder_stage(c4 + c3, c4)
        self.decode3 = _decoder_stage(c4 + c2, c4)
        # Score (detector) head: unused by the refiner, so computed only on request.
        self.convPa = nn.Sequential(
            _conv3x3(c4, c5), nn.InstanceNorm2d(c5, affine=False, eps=1e-5), nn.ReLU(inplace=True)
        )
        self.convPb = nn.Conv2d(c5, 1, kernel_size=1)
        # Descriptor head (no normalisation layer between the two convs).
        self.convDa = _conv3x3(c4, c5)
        self.convDb = nn.Conv2d(c5, descriptor_dim, kernel_size=1)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder half.

        Args:
            image: (B, 3, H, W) float32 RGB in [0, 1], H and W multiples of 8.

        Returns:
            ``(encoded, skip_half, skip_quarter)``: (B, 128, H/8, W/8), (B, 64, H/2, W/2)
            (ReLU(conv2b)) and (B, 128, H/4, W/4) (ReLU(conv3b)).
        """
        _check_image(image)
        x = F.relu(self.conv1a(image))
        x = F.relu(self.conv1b(x))
        x = F.max_pool2d(x, kernel_size=2, stride=2)
        x = F.relu(self.conv2a(x))
        skip_half = F.relu(self.conv2b(x))
        x = F.max_pool2d(skip_half, kernel_size=2, stride=2)
        x = F.relu(self.conv3a(x))
        skip_quarter = F.relu(self.conv3b(x))
        x = F.max_pool2d(skip_quarter, kernel_size=2, stride=2)
        x = F.relu(self.conv4a(x))
        encoded = F.relu(self.conv4b(x))
        return encoded, skip_half, skip_quarter

    def decode(
        self, encoded: torch.Tensor, skip_half: torch.Tensor, skip_quarter: torch.Tensor
    ) -> torch.Tensor:
        """Decoder half: (B, 128, H/8, W/8) → (B, 128, H, W). Skips are appended after the upsampled map."""
        x = self.decode1(encoded)
        x = self.decode2(torch.cat([x, skip_quarter], dim=1))
        return self.decode3(torch.cat([x, skip_half], dim=1))

    def descriptor_head(self, decoded: torch.Tensor) -> torch.Tensor:
        """(B, 128, H, W) → (B, D, H, W) descriptors, L2-normalised over D if configured."""
        descriptors = self.convDb(F.relu(self.convDa(decoded)))
        if self.normalize_output:
            descriptors = F.normalize(descriptors, p=2.0, dim=1, eps=1e-12)
        return descriptors

    def score_head(self, decoded: torch.Tensor) -> torch.Tensor:
        """(B, 128, H, W) → (B, 1, H, W) keypoint scores in (0, 1)."""
        return torch.sigmoid(self.convPb(self.convPa(decoded)))

    def forward(self, image: torch.Tensor, with_scores: bool = False) -> Desc2DOutput:
        """Dense descriptors of an RGB image.

        Args:
            image: (B, 3, H, W) float32 RGB in [0, 1], fed as is (no mean/std). H, W multiples of 8.
            with_scores: also evaluate the score head (~30 % extra cost).

        Returns:
            :class:`Desc2DOutput` with (B, D, H, W) descriptors and (B, 1, H, W) scores or ``None``.
        """
        decoded = self.decode(*self.encode(image))
        scores = self.score_head(decoded) if with_scores else None
        return Desc2DOutput(self.descriptor_head(decoded), scores)


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise Desc2DInputError(f"expected a (B, 3, H, W) image, got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if height % SPATIAL_DIVISOR or width % SPATIAL_DIVISOR:
        raise Desc2DInputError(
            f"image size {height}×{width} must be a multiple of {SPATIAL_DIVISOR} so that the "
            "decoder's upsampled maps line up with the encoder skips"
        )
