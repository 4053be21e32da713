"""The toy world's face backend and prompt scorer, built on the pretrained instruments.

- :class:`ToyFaceAnalyzer` is a :class:`studio.faces.FaceAnalyzer`: the face locator detects,
  the eyes align, the identity encoder embeds. ``face.backend: toy`` selects it.
- :class:`ToyPromptModel` stands where CLIP stands in :mod:`studio.metrics`: an image's score
  for a prompt is the fraction of the scene attributes the prompt asks for that the
  attribute classifiers see (``metrics.clip_model: toy``).

The instruments live in ``assets/toy/instruments`` (docs/TOY.md says how they were trained
and how well they do on identities never seen in pretraining).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.face_analyzer import AlignedFace, DetectedFace, FaceAnalyzer, apply_affine, outside_of_photo
from studio.toy import models as toy_models
from studio.toy.world import NATIVE_SIZE, ToyPromptError, parse_prompt
from studio.weights import TOY_DIR

TOY_PROMPT_MODEL = "toy"
# An attribute counts in the prompt score only when its classifier was right this often on the
# unseen identities (credentials.json); a weaker one would score noise.
MIN_CLASSIFIER_ACCURACY = 0.75


class ToyModelMissing(StudioError, RuntimeError):
    """The pretrained toy files are not where they should be."""


@dataclass(frozen=True, eq=False)
class Instruments:
    locator: toy_models.FaceLocator
    identity: toy_models.IdentityEncoder
    attributes: toy_models.AttributeClassifier
    credentials: dict
    lock: threading.Lock


def _load(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise ToyModelMissing(f"The toy model file {path} is missing; run `python -m studio toy pretrain --out assets/toy`.")
    module.load_state_dict(load_file(str(path)))
    return module.requires_grad_(False).eval()


@lru_cache(maxsize=4)
def load_instruments(folder: str = str(TOY_DIR / "instruments")) -> Instruments:
    """The process-wide toy instruments in ``folder`` (loaded once)."""
    root = Path(folder)
    credentials_file = root / "credentials.json"
    credentials = json.loads(credentials_file.read_text()) if credentials_file.is_file() else {}
    return Instruments(
        locator=_load(toy_models.FaceLocator(), root / "locator.safetensors"),  # type: ignore[arg-type]
        identity=_load(toy_models.IdentityEncoder(), root / "identity.safetensors"),  # type: ignore[arg-type]
        attributes=_load(toy_models.AttributeClassifier(), root / "attributes.safetensors"),  # type: ignore[arg-type]
        credentials=credentials,
        lock=threading.Lock(),
    )


def _square_64(rgb: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(64, 64, 3) view of an image padded to a square (edge replicated), the photo pixels per
    64-px pixel, and the padding offset (x, y) in photo pixels."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if h != w:
        rgb = np.pad(rgb, ((top, side - h - top), (left, side - w - left), (0, 0)), mode="edge")
    small = np.asarray(Image.fromarray(rgb).resize((NATIVE_SIZE, NATIVE_SIZE), Image.BOX if side > NATIVE_SIZE else Image.BICUBIC))
    return small, side / NATIVE_SIZE, (float(left), float(top))


# --------------------------------------------------------------------------- face backend
class ToyFaceAnalyzer(FaceAnalyzer):
    """Face backend of the toy world (see the module docstring). Thread-safe."""

    name = "toy"
    embedding_dim = 128

    def __init__(self, folder: str | Path = TOY_DIR / "instruments") -> None:
        self.instruments = load_instruments(str(folder))
        # the distance at which held-out pairs are best told apart (credentials.json)
        self.same_person_threshold = float(self.instruments.credentials.get("identity", {}).get("threshold", 0.8))

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        small, per_pixel, (left, top) = _square_64(rgb)
        with self.instruments.lock, torch.inference_mode():
            points, logit = self.instruments.locator(toy_models.to_input(small[None]))
        if float(logit[0]) < 0:
            return []
        landmarks = (points[0].numpy() * NATIVE_SIZE * per_pixel - [left, top]).astype(np.float32)
        eye_distance = float(np.linalg.norm(landmarks[1] - landmarks[0]))
        cx, cy = landmarks[4]
        half = eye_distance * 1.2
        return [DetectedFace(box=(cx - half, cy - half, cx + half, cy + half * 1.2),
                             score=float(torch.sigmoid(logit[0])), landmarks=landmarks)]

    def align(self, rgb: np.ndarray, face: DetectedFace, size: int, margin: float) -> AlignedFace:
        zoom = 1.0 / (1.0 + margin)
        matrix = toy_models.alignment_matrix(face.landmarks[0], face.landmarks[1], size, zoom)
        crop = toy_models.warp(rgb, matrix, size)
        landmarks = apply_affine(matrix, face.landmarks)
        outside, _ = outside_of_photo(matrix, rgb.shape[:2], size)
        return AlignedFace(crop, landmarks, float(np.hypot(matrix[0, 0], matrix[0, 1])), outside)

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        crop = toy_models.aligned_crop(rgb, face.landmarks[0], face.landmarks[1])
        with self.instruments.lock, torch.inference_mode():
            z = self.instruments.identity(toy_models.to_input(crop[None]))
        return z[0].numpy().astype(np.float32)

    def eyes_and_nose(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return landmarks[0], landmarks[1], landmarks[2]


# --------------------------------------------------------------------------- prompt scores
@dataclass(frozen=True, eq=False)
class ToyPromptModel:
    """The attribute classifiers in CLIP's place: :meth:`cosines` returns, per image, the
    fraction (0..1) of the attributes its text asks for that are present."""

    name: str = "toy attribute classifiers"

    @property
    def instruments(self) -> Instruments:
        return load_instruments()

    def present(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """The value of each scene attribute the classifiers see in each image."""
        batch = np.stack([np.asarray(im.convert("RGB").resize((NATIVE_SIZE, NATIVE_SIZE), Image.BOX)) for im in images])
        with self.instruments.lock, torch.inference_mode():
            logits = self.instruments.attributes(toy_models.to_input(batch))
        return [
            {a: toy_models.ATTRIBUTE_VALUES[a][int(logits[a][i].argmax())] for a in toy_models.ATTRIBUTE_NAMES}
            for i in range(len(images))
        ]

    @property
    def scored_attributes(self) -> tuple[str, ...]:
        """The attributes whose classifier is credible enough to score (see MIN_CLASSIFIER_ACCURACY)."""
        accuracy = self.instruments.credentials.get("attributes", {})
        return tuple(a for a in toy_models.ATTRIBUTE_NAMES if accuracy.get(a, 1.0) >= MIN_CLASSIFIER_ACCURACY)

    def cosines(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: give one text per image")
        scored = self.scored_attributes
        # words the world does not know ask for nothing it can show, as identity traits ask for
        # nothing a prompt decides: both are left out, so "{} as an astronaut" is scored on its
        # known words and its images keep their identity scores
        asked = [{k: v for k, v in parse_prompt(t, allow_traits=True, allow_unknown=True).items() if k in scored}
                 for t in texts]
        seen = self.present(images)
        return [1.0 if not a else sum(s[k] == v for k, v in a.items()) / len(a) for a, s in zip(asked, seen)]


__all__ = ["TOY_DIR", "ToyFaceAnalyzer", "ToyPromptModel", "ToyPromptError", "load_instruments", "ToyModelMissing"]
