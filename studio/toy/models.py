"""The toy world's own measuring instruments: small conv nets trained on renders (docs/TOY.md).

- :class:`FaceLocator`: image (64², any framing) -> 5 landmarks (eyes, nose, mouth, face
  centre) and a face-present logit. The toy face step detects and aligns with it.
- :class:`IdentityEncoder`: aligned face crop (64²) -> unit vector (128,); the same identity
  across scenes, styles, headwear and expressions is close, different identities far.
- :class:`AttributeClassifier`: image (64²) -> one logit vector per scene attribute.

Each is stored as ``NAME.safetensors`` (weights only) beside a JSON file of its credentials.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.toy.world import ATTRIBUTES

ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
ATTRIBUTE_VALUES = {name: tuple(values) for name, values in ATTRIBUTES.items()}
CROP_SIZE = 64
# canonical eye positions of an aligned crop, as fractions of its side (x, y)
CANONICAL_EYES = ((0.36, 0.42), (0.64, 0.42))


def _conv_trunk(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for c in widths:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                   nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
        c_in = c
    return nn.Sequential(*layers)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [-1, 1]."""
    x = torch.as_tensor(np.array(images)) if isinstance(images, np.ndarray) else images
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class FaceLocator(nn.Module):
    """(N, 3, 64, 64) -> landmarks (N, 5, 2) in [0, 1] image fractions, face logit (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _conv_trunk((32, 64, 96, 128))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.SiLU(), nn.Linear(256, 11))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.trunk(x))
        return torch.sigmoid(out[:, :10]).view(-1, 5, 2) * 1.4 - 0.2, out[:, 10]


class IdentityEncoder(nn.Module):
    """(N, 3, 64, 64) aligned crops -> unit embeddings (N, 128)."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.trunk = _conv_trunk((32, 64, 128, 192))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(192 * 16, 256), nn.SiLU(), nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(x)), dim=-1)


class AttributeClassifier(nn.Module):
    """(N, 3, 64, 64) -> {attribute: logits (N, number of values)}."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _conv_trunk((32, 64, 96, 128))
        self.pool = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in ATTRIBUTE_VALUES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.pool(self.trunk(x))
        return {name: head(h) for name, head in self.heads.items()}


def alignment_matrix(left_eye: np.ndarray, right_eye: np.ndarray, size: int, zoom: float = 1.0) -> np.ndarray:
    """2x3 similarity transform photo -> crop that puts the eyes on :data:`CANONICAL_EYES`.

    ``zoom`` < 1 shows more context around the face (the eye distance shrinks by that factor).
    """
    (lx, ly), (rx, ry) = CANONICAL_EYES
    src = np.array([left_eye, right_eye], np.float64)
    centre = np.array([(lx + rx) / 2, (ly + ry) / 2]) * size
    half = (rx - lx) / 2 * size * zoom
    dst = np.array([centre - [half, 0], centre + [half, 0]])
    # similarity from two point pairs: rotation + uniform scale + shift
    sv, dv = src[1] - src[0], dst[1] - dst[0]
    scale = np.linalg.norm(dv) / max(np.linalg.norm(sv), 1e-6)
    angle = math.atan2(dv[1], dv[0]) - math.atan2(sv[1], sv[0])
    a, b = scale * math.cos(angle), scale * math.sin(angle)
    linear = np.array([[a, -b], [b, a]])
    offset = dst.mean(axis=0) - linear @ src.mean(axis=0)
    return np.hstack([linear, offset[:, None]])


def aligned_crop(rgb: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray, size: int = CROP_SIZE,
                 zoom: float = 1.0) -> np.ndarray:
    """uint8 (size, size, 3) crop with the eyes on the canonical positions (border replicated)."""
    return warp(rgb, alignment_matrix(np.asarray(left_eye), np.asarray(right_eye), size, zoom), size)


def warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3): ``rgb`` through the 2x3 photo -> crop ``matrix`` (border replicated)."""
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size), flags=cv2.INTER_AREA if matrix[0, 0] < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
