"""Face preparation (the photo itself is decoded safely by studio/photos.py): find the face, align a square crop, build a soft
face mask and an identity embedding (docs/FACES.md).

Two backends share one small interface, :class:`FaceAnalyzer`:

- ``dlib`` (always available offline): HOG frontal detector, 5-point landmarks,
  ``dlib.get_face_chip`` alignment and the 128-D ResNet identity model shipped in the
  ``face-recognition-models`` package. Distance is Euclidean: on shared/data/faces, different
  photos of one person measure 0.33-0.53 and different people 0.57-1.07;
  ``FaceConfig.same_person_threshold`` (0.6, dlib's own value) separates them.
- ``insightface`` (buffalo_l) when its model files are already on disk; it is never
  downloaded from here. Distance is the cosine distance ``1 - cos``.

Every problem with a photo becomes a :class:`PhotoError` whose message is a plain sentence;
:func:`prepare` turns each one into a failed :class:`PhotoReport` and carries on, so one bad
photo never loses the others. No traceback reaches the user.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from studio.config import FaceConfig
from studio.face_analyzer import AlignedFace, DetectedFace, FaceAnalyzer, apply_affine, crop_corners, outside_of_photo
from studio.photos import (  # noqa: F401  (the safe decoding lives there; these names stay importable here)
    ALPHA_BACKGROUND,
    MAX_DECODE_PIXELS,
    MAX_FILE_BYTES,
    PhotoError,
    PhotoSource,
    decode_photo,
    load_photo,
)

log = logging.getLogger(__name__)

# HOG detection runs on a copy whose longest side is at most this (speed); landmarks,
# alignment and the embedding then use the full working image.
DETECT_MAX_SIDE = 1024
# Photos decoded and analysed at once, over all sessions: each decode can take a few hundred
# MB and the native models run one call at a time anyway (see PREPARE_SLOTS).
MAX_CONCURRENT_PHOTOS = 2
# Crops enlarged more than this from the photo are flagged as soft.
MAX_CROP_UPSCALE = 2.0
# dlib-style crop padding (0.25 = the tight recognition chip): the margin shrinks down to
# this when the photo has no room around the head, rather than filling the crop with
# stretched border pixels.
MIN_CROP_PADDING = 0.4
# Flag crops of which more than this fraction still lies outside the photo (border-filled).
MAX_OUTSIDE_FRACTION = 0.1
# insightface similarity is cosine; photos with cosine below 0.35 are treated as different
# people (buffalo_l verification thresholds are usually quoted between 0.3 and 0.4).
INSIGHTFACE_SAME_PERSON_DISTANCE = 0.65
INSIGHTFACE_HELP = (
    "Download buffalo_l.zip from the insightface model zoo "
    "(https://github.com/deepinsight/insightface/releases, 'buffalo_l') on a machine with "
    "internet access and unzip it so that the .onnx files sit in {folder}, "
    "or set face.backend to dlib (works offline)."
)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class PhotoReport:
    """What happened to one input photo, usable or not."""

    name: str
    ok: bool
    backend: str
    # faces detected in the photo (the largest one is used)
    faces: int = 0
    # the used face: x0, y0, x1, y1 in the original (EXIF-rotated) photo's pixels
    box: tuple[int, int, int, int] | None = None
    # detector confidence of the used face (dlib: SVM margin, ~0-3; insightface: 0-1)
    score: float | None = None
    warnings: tuple[str, ...] = ()
    # why the photo is unusable (a plain sentence), None when ok
    error: str | None = None
    # the file path as given, None for bytes / in-memory images
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (keys: path, name, ok, backend, faces, box, score, warnings, error)."""
        return {
            "path": self.path if self.path is not None else self.name,
            "name": self.name,
            "ok": self.ok,
            "backend": self.backend,
            "faces": self.faces,
            "box": list(self.box) if self.box is not None else None,
            "score": None if self.score is None else round(float(self.score), 4),
            "warnings": list(self.warnings),
            "error": self.error,
        }


@dataclasses.dataclass(frozen=True)
class PreparedPhoto:
    """One usable photo, ready for training."""

    name: str
    # aligned RGB square of side FaceConfig.crop_size
    crop: Image.Image
    # float32 (crop_size, crop_size) in [0, 1]: soft face mask, 1 on the face
    mask: np.ndarray
    # float32 (5, 2) landmarks in crop pixels (dlib: eye corners + nose; insightface: eyes, nose, mouth corners)
    landmarks: np.ndarray
    # float32 identity embedding (128 for dlib, 512 for insightface)
    embedding: np.ndarray
    report: PhotoReport

    def mask_overlay(self, color: tuple[int, int, int] = (255, 64, 160), strength: float = 0.45) -> Image.Image:
        """The crop with the mask tinted in ``color``, for the UI."""
        crop = np.asarray(self.crop, dtype=np.float32)
        alpha = (strength * self.mask)[..., None]
        tinted = crop * (1.0 - alpha) + np.asarray(color, np.float32) * alpha
        return Image.fromarray(tinted.round().astype(np.uint8), "RGB")

    def mask_at(self, size: int) -> np.ndarray:
        """The mask resized (area average) to ``(size, size)`` float32, e.g. 64 for SD latents."""
        return cv2.resize(self.mask, (size, size), interpolation=cv2.INTER_AREA).clip(0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class PreparedSet:
    """The photos of one person, prepared together."""

    # usable photos only, in input order
    photos: tuple[PreparedPhoto, ...]
    # one report per input, in input order
    reports: tuple[PhotoReport, ...]
    backend: str
    # (n, n) float32 identity distances between usable photos, in the backend's distance
    identity_distances: np.ndarray
    # indices into ``photos`` of photos that probably show a different person
    outliers: tuple[int, ...] = ()

    def only(self, indices: Sequence[int]) -> PreparedSet:
        """The same set with only ``photos[indices]`` usable (the others' reports stay); the
        outliers remain flagged by their place among the kept photos."""
        keep = [int(i) for i in indices]
        distances = self.identity_distances[np.ix_(keep, keep)] if len(self.identity_distances) else self.identity_distances
        outliers = tuple(position for position, i in enumerate(keep) if i in self.outliers)
        return dataclasses.replace(self, photos=tuple(self.photos[i] for i in keep), identity_distances=distances,
                                   outliers=outliers)

    def summary(self) -> str:
        """Short human text: how many photos are usable, which were skipped and why."""
        lines = [f"{len(self.photos)} of {len(self.reports)} photos usable (face backend: {self.backend})."]
        lines += [f"Skipped {r.name}: {r.error}" for r in self.reports if not r.ok]
        if self.outliers:
            names = ", ".join(self.photos[i].name for i in self.outliers)
            lines.append(f"May show a different person: {names}.")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- backends


def _face_recognition_models_dir() -> Path | None:
    # The package's __init__ imports pkg_resources (gone from modern setuptools), so find its
    # folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


DLIB_MODEL_FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")


class DlibFaceAnalyzer(FaceAnalyzer):
    """dlib: HOG detector, 5-point landmarks, get_face_chip, 128-D ResNet.

    Distance: Euclidean between 128-D descriptors (0 for the same image; different photos of
    one person measured 0.33-0.53, different people 0.57-1.07). Similarity:
    ``max(0, 1 - d / (2 * threshold))``, so with the default threshold 0.6 a distance of 0.3
    gives 0.75, the threshold itself 0.5, and 1.2 or more 0.
    Landmarks (dlib 5-point order): right eye outer/inner corner, left eye outer/inner
    corner, bottom of the nose (right/left as seen from the person).
    """

    name = "dlib"
    embedding_dim = 128

    def __init__(self, same_person_threshold: float = 0.6) -> None:
        try:
            import dlib
        except ImportError:
            raise PhotoError("The dlib face backend is not installed: pip install dlib-bin face-recognition-models") from None

        models = _face_recognition_models_dir()
        missing = [f for f in DLIB_MODEL_FILES if models is None or not (models / f).is_file()]
        if missing:
            raise PhotoError(
                "The dlib face models are missing (" + ", ".join(missing) + "). "
                "Install them with: pip install face-recognition-models"
            )
        self._dlib = dlib
        self.same_person_threshold = same_person_threshold
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(models / DLIB_MODEL_FILES[0]))
        self._encoder = dlib.face_recognition_model_v1(str(models / DLIB_MODEL_FILES[1]))
        # The HOG detector, the shape predictor and the DNN keep scratch buffers inside their
        # objects: called from two threads at once they corrupt the heap (SIGSEGV). One lock
        # for all three: one native call at a time.
        self._lock = threading.RLock()

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        dlib = self._dlib
        height, width = rgb.shape[:2]
        shrink = min(1.0, DETECT_MAX_SIDE / max(height, width))
        small = rgb if shrink == 1.0 else cv2.resize(
            rgb, (round(width * shrink), round(height * shrink)), interpolation=cv2.INTER_AREA)
        # HOG finds faces >= ~80 px; upsampling once (4x the work) reaches ~40 px, so try it
        # only when the plain pass finds nothing.
        with self._lock:
            rects, scores, _ = self._detector.run(small, 0, 0.0)
            if not rects:
                rects, scores, _ = self._detector.run(small, 1, 0.0)
        faces = []
        for rect, score in zip(rects, scores):
            box = tuple(v / shrink for v in (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1))
            full_rect = dlib.rectangle(*(round(v) for v in box))
            with self._lock:
                shape = self._landmarks(rgb, full_rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
            faces.append(DetectedFace(box, float(score), points, shape))  # type: ignore[arg-type]
        return sorted(faces, key=lambda f: f.side, reverse=True)

    def align(self, rgb: np.ndarray, face: DetectedFace, size: int, margin: float) -> AlignedFace:
        dlib = self._dlib
        # dlib's padding 0.25 is its tight recognition chip; margin adds context on each side.
        wanted = 0.25 + margin
        to_chip = _chip_matrix(dlib.get_face_chip_details(face.native, size, wanted), size)
        padding = _padding_that_fits(to_chip, size, wanted, rgb.shape[:2])
        if padding != wanted:
            to_chip = _chip_matrix(dlib.get_face_chip_details(face.native, size, padding), size)
        outside, pads = outside_of_photo(to_chip, rgb.shape[:2], size)
        shape = face.native
        if any(pads):
            # get_face_chip fills outside the photo with black; stretch the border instead so
            # the crop has no hard black bars (a mirrored border could duplicate the head).
            left, top, right, bottom = pads
            rgb = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_REPLICATE)
            r = shape.rect
            shape = dlib.full_object_detection(
                dlib.rectangle(r.left() + left, r.top() + top, r.right() + left, r.bottom() + top),
                [dlib.point(p.x + left, p.y + top) for p in shape.parts()],
            )
        with self._lock:
            crop = dlib.get_face_chip(np.ascontiguousarray(rgb), shape, size, padding)
        landmarks = apply_affine(to_chip, face.landmarks)
        scale = float(math.hypot(to_chip[0, 0], to_chip[0, 1]))
        return AlignedFace(crop, landmarks, scale, outside)

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        with self._lock:
            descriptor = self._encoder.compute_face_descriptor(rgb, face.native, 0, 0.25)
        return np.asarray(descriptor, np.float32)

    def eyes_and_nose(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        eye_a, eye_b = landmarks[0:2].mean(axis=0), landmarks[2:4].mean(axis=0)
        left, right = (eye_a, eye_b) if eye_a[0] <= eye_b[0] else (eye_b, eye_a)
        return left, right, landmarks[4]


# ArcFace's 112 px alignment template (insightface.utils.face_align): eyes, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


def insightface_model_dir(cfg: FaceConfig) -> Path:
    """Where the insightface model files for ``cfg`` are expected.

    ``cfg.insightface_root`` may name the folder holding ``<model>/`` (like
    ``~/.insightface/models``) or insightface's own root holding ``models/<model>/``.
    """
    root = Path(cfg.insightface_root or "~/.insightface/models").expanduser()
    nested = root / "models" / cfg.insightface_model
    return nested if nested.is_dir() and not (root / cfg.insightface_model).is_dir() else root / cfg.insightface_model


def _has_onnx(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.onnx"))


class InsightFaceAnalyzer(FaceAnalyzer):
    """insightface (buffalo_l by default): SCRFD detector with 5 keypoints, ArcFace embedding.

    Distance: cosine distance ``1 - cos`` between 512-D embeddings. Similarity: the cosine
    similarity clipped to [0, 1] (the identity score papers report). Landmarks: left eye,
    right eye, nose tip, left and right mouth corner (as seen in the image).
    """

    name = "insightface"
    embedding_dim = 512
    same_person_threshold = INSIGHTFACE_SAME_PERSON_DISTANCE

    def __init__(self, model_dir: Path) -> None:
        if not _has_onnx(model_dir):
            raise PhotoError(
                f"The insightface model files are not in {model_dir}. " + INSIGHTFACE_HELP.format(folder=model_dir)
            )
        from insightface.app import FaceAnalysis

        # Passing the existing folder as ``name`` makes insightface load it directly and
        # never reach its download code.
        self._app = FaceAnalysis(
            name=str(model_dir), root=str(model_dir.parent),
            allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"],
        )
        self._app.prepare(ctx_id=-1, det_size=(640, 640))
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        with self._lock:
            found = self._app.get(np.ascontiguousarray(rgb[..., ::-1]))  # insightface wants BGR
        faces = [
            DetectedFace(tuple(float(v) for v in f.bbox[:4]), float(f.det_score), np.asarray(f.kps, np.float32), f)  # type: ignore[arg-type]
            for f in found
        ]
        return sorted(faces, key=lambda f: f.side, reverse=True)

    def align(self, rgb: np.ndarray, face: DetectedFace, size: int, margin: float) -> AlignedFace:
        # About dlib's framing: the 112 px template is taken as a tight (dlib padding 0.25) chip.
        # The two fit different landmarks, so a face's size differs by up to ~20 % between them.
        def matrix_for(padding: float) -> np.ndarray:
            template_scale = size * (1.0 + 2 * 0.25) / (1.0 + 2 * padding) / 112.0
            template = (ARCFACE_TEMPLATE - 56.0) * template_scale + (size - 1) / 2.0
            return cv2.estimateAffinePartial2D(face.landmarks, template, method=cv2.LMEDS)[0]

        wanted = 0.25 + margin
        matrix = matrix_for(wanted)
        padding = _padding_that_fits(matrix, size, wanted, rgb.shape[:2])
        if padding != wanted:
            matrix = matrix_for(padding)
        scale = float(math.hypot(matrix[0, 0], matrix[0, 1]))
        source = rgb
        to_crop = matrix
        if scale < 0.5:
            # warpAffine samples without low-pass filtering: shrink with area averaging first.
            factor = 2.0 * scale
            source = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
            to_crop = matrix @ np.diag([1.0 / factor, 1.0 / factor, 1.0])
        crop = cv2.warpAffine(source, to_crop, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        outside, _ = outside_of_photo(to_crop, source.shape[:2], size)
        return AlignedFace(crop, apply_affine(matrix, face.landmarks), scale, outside)

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        return np.asarray(face.native.normed_embedding, np.float32)

    def eyes_and_nose(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return landmarks[0], landmarks[1], landmarks[2]

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return 1.0 - self._cosine(a, b)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.clip(self._cosine(a, b), 0.0, 1.0))

    @staticmethod
    def _cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


_ANALYZERS: dict[tuple, FaceAnalyzer] = {}
# Bounds photo decoding + analysis over all sessions and threads (uploads, previews, scores).
PREPARE_SLOTS = threading.BoundedSemaphore(MAX_CONCURRENT_PHOTOS)
_ANALYZERS_LOCK = threading.Lock()


def _insightface_ready(cfg: FaceConfig) -> bool:
    """The insightface package is installed and its model files are on disk."""
    return importlib.util.find_spec("insightface") is not None and _has_onnx(insightface_model_dir(cfg))


def _dlib_ready() -> bool:
    models = _face_recognition_models_dir()
    return importlib.util.find_spec("dlib") is not None and models is not None and all(
        (models / f).is_file() for f in DLIB_MODEL_FILES
    )


def available_backends(cfg: FaceConfig | None = None) -> list[str]:
    """Backends that can run now, best first (insightface only when its files are on disk)."""
    cfg = cfg or FaceConfig()
    return [name for name, ready in (("insightface", _insightface_ready(cfg)), ("dlib", _dlib_ready())) if ready]


def resolve_backend(cfg: FaceConfig) -> str:
    """``cfg.backend`` with "auto" resolved: insightface if it can run, else dlib."""
    if cfg.backend != "auto":
        return cfg.backend
    return "insightface" if _insightface_ready(cfg) else "dlib"


def get_face_analyzer(cfg: FaceConfig) -> FaceAnalyzer:
    """The process-wide analyzer for ``cfg`` (built once, then shared). Raises PhotoError
    naming the missing files when the chosen backend cannot run."""
    backend = resolve_backend(cfg)
    key = (backend, str(insightface_model_dir(cfg)) if backend == "insightface" else cfg.same_person_threshold)
    with _ANALYZERS_LOCK:
        if key not in _ANALYZERS:
            if backend == "toy":
                from studio.toy.instruments import ToyFaceAnalyzer

                _ANALYZERS[key] = ToyFaceAnalyzer()
            elif backend == "insightface":
                if importlib.util.find_spec("insightface") is None:
                    raise PhotoError("The insightface package is not installed: pip install insightface onnxruntime")
                _ANALYZERS[key] = InsightFaceAnalyzer(insightface_model_dir(cfg))
            else:
                _ANALYZERS[key] = DlibFaceAnalyzer(cfg.same_person_threshold)
        return _ANALYZERS[key]


# ----------------------------------------------------------------------------- geometry


def _chip_matrix(details: Any, size: int) -> np.ndarray:
    """2x3 affine photo -> chip of a dlib ``chip_details``: the rect, rotated by ``angle``
    about its centre, maps corner to corner onto the chip (checked against get_face_chip)."""
    rect = details.rect
    cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
    scale = (size - 1) / (rect.right() - rect.left())
    cos, sin = math.cos(-details.angle) * scale, math.sin(-details.angle) * scale
    linear = np.array([[cos, -sin], [sin, cos]])
    offset = np.array([(size - 1) / 2.0, (size - 1) / 2.0]) - linear @ np.array([cx, cy])
    return np.hstack([linear, offset[:, None]])


def _padding_that_fits(to_crop: np.ndarray, size: int, padding: float, photo_hw: tuple[int, int]) -> float:
    """The largest padding <= ``padding`` (but >= MIN_CROP_PADDING) whose crop, shrunk about
    its centre, stays inside the photo. The crop side is proportional to 1 + 2 * padding."""
    height, width = photo_hw
    centre = apply_affine(cv2.invertAffineTransform(to_crop), np.array([[size / 2, size / 2]], np.float32))[0]
    offsets = crop_corners(to_crop, size) - centre
    limits = np.where(offsets > 0, (np.array([width, height]) - centre) / np.maximum(offsets, 1e-9),
                      centre / np.maximum(-offsets, 1e-9))
    shrink = float(min(1.0, limits.min()))
    return float(np.clip((shrink * (1 + 2 * padding) - 1) / 2, min(MIN_CROP_PADDING, padding), padding))


def face_mask(analyzer: FaceAnalyzer, landmarks: np.ndarray, size: int, feather: float) -> np.ndarray:
    """Soft face mask float32 (size, size) in [0, 1] from 5 landmarks in crop pixels.

    An ellipse built on the eye line covers forehead to chin and cheek to cheek (adult face
    proportions in units of the eye distance), then a Gaussian feathers its edge with
    sigma = feather * size / 2.
    """
    left_eye, right_eye, nose = (np.asarray(p, np.float64) for p in analyzer.eyes_and_nose(landmarks))
    eye_mid = (left_eye + right_eye) / 2.0
    eye_distance = max(float(np.linalg.norm(right_eye - left_eye)), 1.0)
    across = (right_eye - left_eye) / eye_distance
    down = np.array([-across[1], across[0]])
    if down @ (nose - eye_mid) < 0:  # the nose is below the eyes, whatever the image axes say
        down = -down
    # Eyes sit a little above the middle of the face: hairline ~1.2 eye distances above
    # them, chin ~1.9 below; cheekbones ~1.1 to each side. In a three-quarter view the nose
    # swings towards the side the person faces while the visible cheek widens on the other
    # side: widen the ellipse towards that cheek, keeping its far edge where it was.
    nose_shift = float((nose - eye_mid) @ across)
    centre = eye_mid + 0.4 * eye_distance * down - 0.8 * nose_shift * across
    axes = (1.1 * eye_distance + 0.8 * abs(nose_shift), 1.6 * eye_distance)
    angle = math.degrees(math.atan2(across[1], across[0]))
    mask = np.zeros((size, size), np.float32)
    cv2.ellipse(mask, (tuple(centre), (2 * axes[0], 2 * axes[1]), angle), 1.0, thickness=-1, lineType=cv2.LINE_AA)
    sigma = max(feather * size / 2.0, 0.5)
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return mask.clip(0.0, 1.0)


# ----------------------------------------------------------------------------- preparing


def _source_name(source: PhotoSource) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name or str(source)
    if isinstance(source, Image.Image) and getattr(source, "filename", ""):
        return Path(source.filename).name
    return "photo"


def _has_small_face(analyzer: FaceAnalyzer, rgb: np.ndarray) -> bool:
    """Whether a face too small for the detector shows up in a 2x enlarged copy (docs/FACES.md):
    then the photo is told the minimum size instead of "no face"."""
    height, width = rgb.shape[:2]
    if max(height, width) * 2 > 2 * DETECT_MAX_SIDE:
        return False  # the detector would shrink the copy back: nothing to gain
    return bool(analyzer.detect(cv2.resize(rgb, (width * 2, height * 2), interpolation=cv2.INTER_CUBIC)))


def _prepare(source: PhotoSource, cfg: FaceConfig, analyzer: FaceAnalyzer, name: str) -> PreparedPhoto:
    path = str(source) if isinstance(source, (str, Path)) else None
    report = PhotoReport(name=name, ok=False, backend=analyzer.name, path=path)
    try:
        loaded = decode_photo(source, cfg.max_pixels)
    except PhotoError as err:
        raise PhotoError(str(err), dataclasses.replace(report, error=str(err))) from None
    notes = list(loaded.warnings)
    rgb = np.ascontiguousarray(np.asarray(loaded.image))
    faces = analyzer.detect(rgb)
    if not faces and _has_small_face(analyzer, rgb):
        message = (f"The face is too small to use: it must be at least {cfg.min_face_px} pixels across. "
                   "Use a closer or higher-resolution photo, or crop the photo around the face.")
        raise PhotoError(message, dataclasses.replace(report, warnings=tuple(notes), error=message))
    if not faces:
        message = ("No face was found in this photo. Use a photo where the face is clearly visible, "
                   "looks roughly towards the camera, is well lit and not covered (sunglasses, hands, mask).")
        raise PhotoError(message, dataclasses.replace(report, warnings=tuple(notes), error=message))
    face = faces[0]
    to_original = loaded.original_size[0] / rgb.shape[1]
    x0, y0, x1, y1 = (v * to_original for v in face.box)
    box = (max(0, round(x0)), max(0, round(y0)),
           min(loaded.original_size[0], round(x1)), min(loaded.original_size[1], round(y1)))
    side = face.side * to_original
    if len(faces) > 1:
        notes.append(f"Found {len(faces)} faces; using the largest one. A photo with only this person works best.")
    report = dataclasses.replace(report, faces=len(faces), box=box, score=face.score, warnings=tuple(notes))
    if side < cfg.min_face_px:
        message = (f"The face is too small ({side:.0f} pixels across); it must be at least {cfg.min_face_px} "
                   "pixels. Use a closer or higher-resolution photo, or crop the photo around the face.")
        raise PhotoError(message, dataclasses.replace(report, error=message))
    aligned = analyzer.align(rgb, face, cfg.crop_size, cfg.margin)
    if aligned.scale > MAX_CROP_UPSCALE:
        notes.append(f"The face covers few pixels, so the {cfg.crop_size} px crop is enlarged "
                     f"{aligned.scale:.1f}x and may look soft; a sharper or closer photo works better.")
    if aligned.outside_fraction > MAX_OUTSIDE_FRACTION:
        notes.append(f"The face is close to the photo's edge: {aligned.outside_fraction:.0%} of the crop "
                     "was filled by stretching the border. A photo with more room around the head works better.")
    embedding = analyzer.embed(rgb, face)
    mask = face_mask(analyzer, aligned.landmarks, cfg.crop_size, cfg.mask_feather)
    report = dataclasses.replace(report, ok=True, warnings=tuple(notes))
    return PreparedPhoto(name, Image.fromarray(aligned.crop, "RGB"), mask, aligned.landmarks, embedding, report)



def prepare_photo(source: PhotoSource, cfg: FaceConfig, analyzer: FaceAnalyzer | None = None,
                  name: str | None = None) -> PreparedPhoto:
    """Load, detect, align, mask and embed one photo. Raises PhotoError (with ``.report``)."""
    analyzer = analyzer or get_face_analyzer(cfg)
    name = name or _source_name(source)
    try:
        with PREPARE_SLOTS:
            return _prepare(source, cfg, analyzer, name)
    except PhotoError:
        raise
    except MemoryError:
        message = "There was not enough memory to process this photo. Try a smaller photo."
    except Exception as exc:  # never let a traceback reach the user; keep it in the log
        log.exception("unexpected error preparing %s", name)
        message = f"This photo could not be processed because of an unexpected problem ({type(exc).__name__}). Try another photo."
    path = str(source) if isinstance(source, (str, Path)) else None
    raise PhotoError(message, PhotoReport(name=name, ok=False, backend=analyzer.name, error=message, path=path))


def find_outliers(distances: np.ndarray, threshold: float) -> tuple[int, ...]:
    """Photos closer than ``threshold`` to fewer than half of the others (n >= 2).

    With two photos of different people both are flagged: nothing says which one is meant.
    """
    n = len(distances)
    if n < 2:
        return ()
    close = (distances < threshold).sum(axis=1) - 1  # minus the photo itself
    return tuple(int(i) for i in np.flatnonzero(2 * close < n - 1))


def prepare(sources: Sequence[PhotoSource], cfg: FaceConfig, analyzer: FaceAnalyzer | None = None) -> PreparedSet:
    """Prepare the photos of one person. A bad photo becomes a failed report and the rest go
    on; raises PhotoError (with ``.reports``) only when no photo is usable."""
    analyzer = analyzer or get_face_analyzer(cfg)
    # bytes and unnamed images get "photo 1", "photo 2", ... so reports stay distinguishable
    names = [_source_name(s) if _source_name(s) != "photo" else f"photo {i + 1}" for i, s in enumerate(sources)]
    prepared: list[PreparedPhoto] = []
    reports: list[PhotoReport] = []
    report_of_photo: list[int] = []  # index into reports of each prepared photo
    for source, name in zip(sources, names):
        try:
            photo = prepare_photo(source, cfg, analyzer, name)
        except PhotoError as err:
            reports.append(err.report or PhotoReport(name=name, ok=False, backend=analyzer.name, error=str(err)))
            continue
        report_of_photo.append(len(reports))
        prepared.append(photo)
        reports.append(photo.report)
    if not prepared:
        problems = "; ".join(f"{r.name}: {r.error}" for r in reports) or "no photos were given."
        raise PhotoError(f"None of the photos can be used. {problems}", reports=tuple(reports))

    distances = analyzer.distance_matrix(np.stack([p.embedding for p in prepared]))
    outliers = find_outliers(distances, analyzer.same_person_threshold)
    for index in outliers:
        others = np.delete(distances[index], index)
        others_named = "the other photo" if len(prepared) == 2 else "the others"
        note = (f"This photo may show a different person from {others_named} (identity distance "
                f"{float(np.median(others)):.2f}; the same person is usually below {analyzer.same_person_threshold:.2f}).")
        photo = prepared[index]
        report = dataclasses.replace(photo.report, warnings=photo.report.warnings + (note,))
        prepared[index] = dataclasses.replace(photo, report=report)
        reports[report_of_photo[index]] = report
    return PreparedSet(tuple(prepared), tuple(reports), analyzer.name, distances, outliers)



# ----------------------------------------------------------------------------- metrics


def identity_embedding(image: PhotoSource | np.ndarray, analyzer: FaceAnalyzer,
                       max_pixels: int = FaceConfig.max_pixels) -> np.ndarray | None:
    """Embedding float32 (D,) of the largest face in ``image``; None when no face is found
    (e.g. a generated image without a face). Raises PhotoError for unreadable files."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with PREPARE_SLOTS:
        loaded = decode_photo(image, max_pixels)
        rgb = np.ascontiguousarray(np.asarray(loaded.image))
        faces = analyzer.detect(rgb)
        return analyzer.embed(rgb, faces[0]) if faces else None


def identity_similarity(a: PhotoSource | np.ndarray, b: PhotoSource | np.ndarray,
                        analyzer: FaceAnalyzer) -> float | None:
    """Identity similarity in [0, 1] (1 = same face, see the analyzer's docstring) between
    two images or embeddings (1-D arrays); None when either image has no face."""
    def as_embedding(x: PhotoSource | np.ndarray) -> np.ndarray | None:
        if isinstance(x, np.ndarray) and x.ndim == 1:
            return x
        return identity_embedding(x, analyzer)

    emb_a, emb_b = as_embedding(a), as_embedding(b)
    if emb_a is None or emb_b is None:
        return None
    return analyzer.similarity(emb_a, emb_b)
