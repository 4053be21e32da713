"""What a face backend is (docs/FACES.md): the :class:`FaceAnalyzer` interface and the faces it
finds. The backends (studio/faces.py: dlib, insightface; studio/toy/instruments.py: the toy
world's) implement it; studio/faces.py picks one and prepares photos with it. The crop geometry
all of them share (where a crop lies, how much of it falls outside the photo) is here too.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class DetectedFace:
    """A face found by an analyzer, in the pixels of the image it analysed."""

    # x0, y0, x1, y1 (floats, may reach outside the image)
    box: tuple[float, float, float, float]
    score: float
    # float32 (5, 2) landmarks in image pixels
    landmarks: np.ndarray
    # the backend's own object (dlib full_object_detection, insightface Face)
    native: Any = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def side(self) -> float:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclasses.dataclass(frozen=True)
class AlignedFace:
    """An aligned crop and where the landmarks landed in it."""

    crop: np.ndarray  # uint8 (size, size, 3)
    landmarks: np.ndarray  # float32 (5, 2) crop pixels
    scale: float  # crop pixels per photo pixel (> 1: the crop is enlarged)
    outside_fraction: float  # share of the crop that lies outside the photo


class FaceAnalyzer(ABC):
    """Detects faces, aligns crops and computes identity embeddings for one backend.

    ``distance`` is the backend's own scale (dlib: Euclidean, insightface: 1 - cosine);
    ``similarity`` maps it monotonically to [0, 1] (1 = same face), see the subclasses.
    Instances are shared per process (``studio.faces.get_face_analyzer``) and are thread-safe.
    """

    name: str
    embedding_dim: int
    same_person_threshold: float

    @abstractmethod
    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """Faces in an RGB uint8 (H, W, 3) image, largest first."""

    @abstractmethod
    def align(self, rgb: np.ndarray, face: DetectedFace, size: int, margin: float) -> AlignedFace:
        """An upright square crop of side ``size``; ``margin`` 0 = tight face, 0.5 = head and shoulders."""

    @abstractmethod
    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """Identity embedding float32 (embedding_dim,) of ``face``."""

    @abstractmethod
    def eyes_and_nose(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left-of-image eye centre, right-of-image eye centre, nose) from the 5 landmarks, each (2,)."""

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """``1 - d / (2 * threshold)`` clipped to [0, 1]: 1 = identical, 0.5 = the same-person threshold."""
        return float(np.clip(1.0 - self.distance(a, b) / (2.0 * self.same_person_threshold), 0.0, 1.0))

    def distance_matrix(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, n) float32 distances between the rows of ``embeddings`` (n, D)."""
        n = len(embeddings)
        out = np.zeros((n, n), np.float32)
        for i in range(n):
            for j in range(i + 1, n):
                out[i, j] = out[j, i] = self.distance(embeddings[i], embeddings[j])
        return out


# ----------------------------------------------------------------------------- crop geometry (every backend)
def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) float32 points through a 2x3 affine ``matrix``."""
    return (np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def crop_corners(to_crop: np.ndarray, size: int) -> np.ndarray:
    """(4, 2) photo coordinates of the crop's corners."""
    return apply_affine(cv2.invertAffineTransform(to_crop), np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float32))


def outside_of_photo(to_crop: np.ndarray, photo_hw: tuple[int, int], size: int) -> tuple[float, tuple[int, int, int, int]]:
    """Share of the crop that falls outside the photo, and the (left, top, right, bottom)
    padding the photo needs to contain the whole crop."""
    height, width = photo_hw
    corners = crop_corners(to_crop, size)
    (min_x, min_y), (max_x, max_y) = corners.min(axis=0), corners.max(axis=0)
    if min_x >= 0 and min_y >= 0 and max_x <= width and max_y <= height:
        return 0.0, (0, 0, 0, 0)
    pads = tuple(max(0, math.ceil(v) + 2) for v in (-min_x, -min_y, max_x - width, max_y - height))
    # Warp a coarse "inside the photo" map onto a 64 x 64 grid: cheap and exact enough.
    probe, step = 64, max(1, math.ceil(max(height, width) / 256))
    inside = np.ones((math.ceil(height / step), math.ceil(width / step)), np.uint8)
    probe_matrix = (probe / size) * to_crop @ np.diag([step, step, 1.0])
    warped = cv2.warpAffine(inside, probe_matrix, (probe, probe), flags=cv2.INTER_NEAREST, borderValue=0)
    return float(1.0 - warped.mean()), pads  # type: ignore[return-value]
