"""Face preparation (studio.faces): real photos from shared/data/faces, and every kind of bad
photo from docs/FACES.md "Bad input", built here with PIL so nothing is stored in the repo.

All offline on the dlib backend; each photo is prepared once per module.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from studio.config import FaceConfig
from studio.faces import (
    FaceAnalyzer,
    PhotoError,
    PhotoReport,
    PreparedPhoto,
    available_backends,
    get_face_analyzer,
    identity_embedding,
    identity_similarity,
    load_photo,
    prepare,
    prepare_photo,
    resolve_backend,
)

REPO = Path(__file__).resolve().parents[1]
NEWTON = ["newton_man/newton_0.jpg", "newton_man/newton_1.jpg", "newton_man/newton_2.png", "newton_man/newton_3.jpg"]
SCARLETT = [f"scarletthead_woman/scarlett_{i}.jpg" for i in range(4)]
SINGLES = [f"single/f2d_{i}.jpg" for i in range(5)] + ["single/lenna.jpg", "single/persona_person_1.jpg", "single/statue.png"]
ALL_PHOTOS = NEWTON + SCARLETT + SINGLES


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def faces_dir() -> Path:
    """The shared test photos: $STUDIO_FACES_DIR or ../shared/data/faces beside the repo."""
    folder = Path(os.environ.get("STUDIO_FACES_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "faces")
    missing = [name for name in ALL_PHOTOS if not (folder / name).is_file()]
    if missing:
        pytest.fail(
            f"test photos missing in {folder} ({', '.join(missing[:3])}...): set STUDIO_FACES_DIR to the "
            "shared faces folder (shared/data/faces, see its README.md)", pytrace=False,
        )
    return folder


@pytest.fixture(scope="module")
def cfg() -> FaceConfig:
    return FaceConfig(backend="dlib")


@pytest.fixture(scope="module")
def analyzer(cfg: FaceConfig) -> FaceAnalyzer:
    return get_face_analyzer(cfg)


@pytest.fixture(scope="module")
def prepared(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> dict[str, PreparedPhoto]:
    """Every shared photo prepared once: {"newton_man/newton_0.jpg": PreparedPhoto, ...}."""
    return {name: prepare_photo(faces_dir / name, cfg, analyzer) for name in ALL_PHOTOS}


@pytest.fixture(scope="module")
def face_photo(faces_dir: Path) -> Image.Image:
    """A frontal, studio-like 512 x 512 portrait to build bad files from."""
    return Image.open(faces_dir / "single/f2d_1.jpg").convert("RGB")


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def expect_photo_error(source, cfg: FaceConfig, analyzer: FaceAnalyzer, *words: str) -> PhotoError:
    """prepare_photo fails with a message containing every word (case-insensitive), no traceback."""
    with pytest.raises(PhotoError) as caught:
        prepare_photo(source, cfg, analyzer, name="upload.jpg")
    message = str(caught.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert "Traceback" not in message and caught.value.report is not None and not caught.value.report.ok
    return caught.value


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims width x height (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then chunk length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


# ----------------------------------------------------------------------------- real photos


def test_a_face_is_found_in_every_shared_photo(prepared: dict[str, PreparedPhoto], faces_dir: Path, cfg: FaceConfig) -> None:
    # statue.png (a marble bust) is included: dlib's HOG finds it, with a low score.
    for name, photo in prepared.items():
        report = photo.report
        assert report.ok and report.faces >= 1 and report.error is None, name
        width, height = Image.open(faces_dir / name).size
        x0, y0, x1, y1 = report.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (name, report.box)
        assert photo.crop.mode == "RGB" and photo.crop.size == (cfg.crop_size, cfg.crop_size)
        assert photo.landmarks.shape == (5, 2) and photo.landmarks.dtype == np.float32
        assert photo.embedding.shape == (128,) and photo.embedding.dtype == np.float32
        margin = 0.1 * cfg.crop_size
        assert ((photo.landmarks > margin) & (photo.landmarks < cfg.crop_size - margin)).all(), (name, photo.landmarks)
        eyes_y, nose_y = photo.landmarks[:4, 1].mean(), photo.landmarks[4, 1]
        assert nose_y > eyes_y + 0.1 * cfg.crop_size, f"{name}: the crop is not upright"
        json.dumps(report.to_dict())


def test_box_is_in_original_pixels_of_a_downscaled_photo(prepared: dict[str, PreparedPhoto]) -> None:
    # persona_person_1.jpg is 3840 x 3840, above max_pixels: detection ran on a smaller copy.
    x0, y0, x1, y1 = prepared["single/persona_person_1.jpg"].report.box
    assert x1 - x0 > 1000 and 0 < x0 and x1 < 3840


def test_same_person_is_closer_than_different_people(prepared: dict[str, PreparedPhoto], analyzer: FaceAnalyzer) -> None:
    groups = [NEWTON, SCARLETT]
    same, different = [], []
    for g, group in enumerate(groups):
        for a in group:
            for b in group:
                if a < b:
                    same.append(analyzer.distance(prepared[a].embedding, prepared[b].embedding))
            for b in groups[1 - g]:
                different.append(analyzer.distance(prepared[a].embedding, prepared[b].embedding))
    assert max(same) < min(different), (max(same), min(different))
    assert max(same) < analyzer.same_person_threshold < min(different)


def test_mask_covers_the_face_and_little_else(prepared: dict[str, PreparedPhoto], analyzer: FaceAnalyzer, cfg: FaceConfig) -> None:
    import cv2

    size = cfg.crop_size
    corner = size // 8
    for name, photo in prepared.items():
        mask = photo.mask
        assert mask.shape == (size, size) and mask.dtype == np.float32 and 0.0 <= mask.min() and mask.max() <= 1.0
        left_eye, right_eye, nose = analyzer.eyes_and_nose(photo.landmarks)
        inner_face = np.zeros((size, size), np.uint8)
        cv2.fillConvexPoly(inner_face, np.round([left_eye, right_eye, nose]).astype(np.int32), 1)
        assert mask[inner_face > 0].mean() > 0.97, name
        for x, y in (left_eye, right_eye, nose):
            assert mask[int(y), int(x)] > 0.95, name
        corners = [mask[:corner, :corner], mask[:corner, -corner:], mask[-corner:, :corner], mask[-corner:, -corner:]]
        assert max(float(c.mean()) for c in corners) < 0.02, name
        # "little else": low beyond the cheeks and above the hairline, area ~ a face's
        eye_mid, eye_distance = (left_eye + right_eye) / 2, float(np.linalg.norm(right_eye - left_eye))
        across = (right_eye - left_eye) / eye_distance
        up = np.array([across[1], -across[0]])
        for point in (eye_mid - 2.2 * eye_distance * across, eye_mid + 2.2 * eye_distance * across, eye_mid + 1.9 * eye_distance * up):
            x, y = np.round(point).astype(int)
            if 0 <= x < size and 0 <= y < size:  # tight crops leave the hairline outside
                assert mask[y, x] < 0.1, (name, point)
        assert 3.5 < float((mask > 0.5).sum()) / eye_distance**2 < 8.0, name
        small = photo.mask_at(64)
        assert small.shape == (64, 64) and abs(float(small.mean()) - float(mask.mean())) < 0.01
        assert photo.mask_overlay().size == photo.crop.size


def test_identity_similarity_of_flipped_self_is_high_and_of_others_low(faces_dir: Path, analyzer: FaceAnalyzer, face_photo: Image.Image) -> None:
    flipped = ImageOps.mirror(face_photo)
    other = Image.open(faces_dir / "scarletthead_woman/scarlett_1.jpg")
    self_similarity = identity_similarity(face_photo, flipped, analyzer)
    other_similarity = identity_similarity(face_photo, other, analyzer)
    assert self_similarity is not None and other_similarity is not None
    assert self_similarity > 0.6 and other_similarity < 0.4 and self_similarity > other_similarity + 0.3
    embedding = identity_embedding(face_photo, analyzer)
    assert identity_similarity(embedding, embedding, analyzer) == pytest.approx(1.0)
    assert identity_similarity(embedding, flipped, analyzer) == pytest.approx(self_similarity, abs=1e-5)
    blank = Image.new("RGB", (256, 256), (90, 140, 200))
    assert identity_embedding(blank, analyzer) is None
    assert identity_similarity(face_photo, blank, analyzer) is None


# ----------------------------------------------------------------------------- sets


def test_prepare_flags_a_different_person_among_several(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    sources = [faces_dir / name for name in SCARLETT] + [faces_dir / "newton_man/newton_0.jpg"]
    result = prepare(sources, cfg, analyzer)
    assert len(result.photos) == 5 and result.identity_distances.shape == (5, 5)
    assert result.outliers == (4,)
    assert any("different person" in w for w in result.photos[4].report.warnings)
    assert result.reports[4] == result.photos[4].report
    assert not any("different person" in w for p in result.photos[:4] for w in p.report.warnings)
    assert "newton_0.jpg" in result.summary()


def test_one_person_set_has_no_outliers(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    result = prepare([faces_dir / name for name in NEWTON], cfg, analyzer)
    assert result.outliers == () and len(result.photos) == 4


def test_prepare_keeps_going_past_bad_photos_and_keeps_order(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    sources = [b"this is not a photo", faces_dir / "single/f2d_0.jpg", Image.new("RGB", (300, 300), "white")]
    result = prepare(sources, cfg, analyzer)
    assert [r.ok for r in result.reports] == [False, True, False]
    assert "not an image" in result.reports[0].error and "No face" in result.reports[2].error
    assert len(result.photos) == 1 and result.photos[0].name == "f2d_0.jpg"
    assert "Skipped" in result.summary()


def test_prepare_raises_only_when_no_photo_is_usable(cfg: FaceConfig, analyzer: FaceAnalyzer, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("shopping list: eggs, milk")
    with pytest.raises(PhotoError) as caught:
        prepare([text, Image.new("RGB", (300, 300), "white")], cfg, analyzer)
    message = str(caught.value)
    assert "notes.jpg" in message and "not an image" in message and "No face" in message
    assert [r.ok for r in caught.value.reports] == [False, False]


class EmbeddingFails(FaceAnalyzer):
    """Delegates to a real analyzer but its embedding network crashes."""

    name, embedding_dim, same_person_threshold = "dlib", 128, 0.6

    def __init__(self, inner: FaceAnalyzer) -> None:
        self.inner = inner

    def detect(self, rgb):
        return self.inner.detect(rgb)

    def align(self, rgb, face, size, margin):
        return self.inner.align(rgb, face, size, margin)

    def eyes_and_nose(self, landmarks):
        return self.inner.eyes_and_nose(landmarks)

    def embed(self, rgb, face):
        raise RuntimeError("kernel exploded at 0xdeadbeef")


def test_unexpected_failure_becomes_a_plain_message(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    with pytest.raises(PhotoError) as caught:
        prepare([faces_dir / "single/f2d_0.jpg"], cfg, EmbeddingFails(analyzer))
    report = caught.value.reports[0]
    assert not report.ok and "unexpected problem" in report.error and "Try another photo" in report.error
    assert "0xdeadbeef" not in report.error and "Traceback" not in report.error


# ----------------------------------------------------------------------------- bad photos


def test_no_face(cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    gradient = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    expect_photo_error(gradient, cfg, analyzer, "no face", "camera")


def test_several_faces_uses_the_largest_and_says_so(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer, face_photo: Image.Image) -> None:
    big = Image.open(faces_dir / "scarletthead_woman/scarlett_1.jpg").convert("RGB")
    group = Image.new("RGB", (1000, 600), (120, 120, 120))
    group.paste(big, (0, 40))
    group.paste(face_photo.resize((300, 300)), (650, 150))
    photo = prepare_photo(group, cfg, analyzer)
    assert photo.report.faces == 2 and photo.report.box[2] < 600  # the box is on the left, larger face
    assert any("2 faces" in w and "largest" in w for w in photo.report.warnings)
    alone = identity_embedding(big, analyzer)
    assert analyzer.distance(photo.embedding, alone) < 0.2


def test_face_too_small_names_the_minimum(cfg: FaceConfig, analyzer: FaceAnalyzer, face_photo: Image.Image) -> None:
    canvas = Image.new("RGB", (400, 400), (120, 120, 120))
    canvas.paste(face_photo.resize((90, 90)), (150, 150))
    error = expect_photo_error(canvas, cfg, analyzer, "too small", f"{cfg.min_face_px} pixels")
    assert error.report.faces == 1 and error.report.box is not None


def test_huge_jpeg_is_decoded_at_reduced_scale(cfg: FaceConfig, analyzer: FaceAnalyzer, face_photo: Image.Image) -> None:
    big = encode(face_photo.resize((3072, 3072), Image.Resampling.BILINEAR), "JPEG", quality=80)
    image, notes = load_photo(big, max_pixels=500_000)
    assert image.width * image.height <= 500_000 and image.info["original_size"] == (3072, 3072)
    small_cfg = FaceConfig(backend="dlib", max_pixels=500_000)
    photo = prepare_photo(big, small_cfg, analyzer)
    reference = np.array(prepare_photo(face_photo, small_cfg, analyzer).report.box) * 6
    # the box is in the 3072 px photo's pixels: about 6x the 512 px original's box (HOG boxes
    # come in discrete sizes, so compare centres tightly and sides loosely)
    box = np.array(photo.report.box)
    assert np.allclose((box[:2] + box[2:]) / 2, (reference[:2] + reference[2:]) / 2, atol=3072 * 0.03), (box, reference)
    assert 0.75 < (box[2] - box[0]) / (reference[2] - reference[0]) < 1.33


def test_decompression_bomb_png_gives_a_clear_message(cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    # Beyond PIL's own limit (2 x 89 MP): PIL refuses at open; we turn it into a sentence.
    expect_photo_error(png_with_header_size(30_000, 30_000), cfg, analyzer, "too large", "900 megapixels", "resize")
    # Under PIL's limit but over ours: refused before decoding a single row.
    expect_photo_error(png_with_header_size(9_000, 7_000), cfg, analyzer, "too large", "63 megapixels")


def test_corrupt_file(cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8
    expect_photo_error(garbage, cfg, analyzer, "damaged")


def test_truncated_jpeg_and_png(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    jpeg = (faces_dir / "single/f2d_0.jpg").read_bytes()
    expect_photo_error(jpeg[: len(jpeg) // 2], cfg, analyzer, "incomplete", "again")
    png = (faces_dir / "newton_man/newton_2.png").read_bytes()
    expect_photo_error(png[: len(png) // 2], cfg, analyzer, "incomplete")


def test_not_an_image(cfg: FaceConfig, analyzer: FaceAnalyzer, tmp_path: Path) -> None:
    text = tmp_path / "holiday.jpg"
    text.write_text("Dear Sir, please find my photo attached.\n")
    expect_photo_error(text, cfg, analyzer, "not an image", "text", "JPEG")
    pdf = tmp_path / "scan.jpg"
    pdf.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n")
    expect_photo_error(pdf, cfg, analyzer, "not an image", "PDF")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    expect_photo_error(empty, cfg, analyzer, "empty")
    expect_photo_error(tmp_path / "missing.jpg", cfg, analyzer, "does not exist")


def test_animated_gif_uses_the_first_frame(cfg: FaceConfig, analyzer: FaceAnalyzer, face_photo: Image.Image) -> None:
    others = [Image.new("RGB", face_photo.size, (30 * i, 30, 30)) for i in (1, 2)]  # identical frames would merge
    gif = encode(face_photo, "GIF", save_all=True, append_images=others, duration=100, loop=0)
    photo = prepare_photo(gif, cfg, analyzer)
    assert any("animated" in w and "3 frames" in w and "first frame" in w for w in photo.report.warnings)


@pytest.mark.parametrize(
    ("mode", "fmt", "words"),
    [
        ("CMYK", "JPEG", ("CMYK",)),
        ("I;16", "PNG", ("16-bit",)),
        ("RGBA", "PNG", ("transparent", "white")),
        ("L", "JPEG", ("black-and-white",)),
        ("P", "PNG", ("palette",)),
    ],
)
def test_unusual_colour_modes_are_converted_to_rgb(mode: str, fmt: str, words: tuple[str, ...], cfg: FaceConfig,
                                                   analyzer: FaceAnalyzer, face_photo: Image.Image) -> None:
    if mode == "I;16":
        grey = np.asarray(face_photo.convert("L"), np.uint16) * 257  # full 16-bit range
        source = Image.fromarray(grey)
        assert source.mode == "I;16"
    elif mode == "RGBA":
        source = face_photo.convert("RGBA")
        alpha = np.full(face_photo.size[::-1], 255, np.uint8)
        alpha[:, :40] = 0  # a transparent strip at the left edge
        source.putalpha(Image.fromarray(alpha))
    else:
        source = face_photo.convert(mode)
    data = encode(source, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    image, notes = load_photo(data, max_pixels=cfg.max_pixels)
    assert image.mode == "RGB"
    assert any(all(w in note for w in words) for note in notes), notes
    if mode == "I;16":  # rescaled, not clipped to white
        assert 60 < np.asarray(image).mean() < 200
    if mode == "RGBA":
        assert (np.asarray(image)[:, :40] == 255).all()
    photo = prepare_photo(data, cfg, analyzer)
    assert photo.report.ok and photo.report.warnings == tuple(notes)


def test_exif_rotated_photo_is_turned_upright(faces_dir: Path, cfg: FaceConfig, analyzer: FaceAnalyzer) -> None:
    upright = Image.new("RGB", (512, 720), (200, 200, 200))
    upright.paste(Image.open(faces_dir / "scarletthead_woman/scarlett_1.jpg").convert("RGB"), (0, 100))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a sideways camera writes it: 720 x 512
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    with_tag = encode(stored, "JPEG", exif=exif.tobytes())
    image, _ = load_photo(with_tag, max_pixels=cfg.max_pixels)
    assert image.size == (512, 720)
    photo = prepare_photo(with_tag, cfg, analyzer)
    x0, y0, x1, y1 = photo.report.box
    assert x1 <= 512 and y0 >= 100  # in upright pixels: the face is in the pasted square
    # the same pixels without the tag: the HOG detector finds no sideways face
    expect_photo_error(encode(stored, "JPEG"), cfg, analyzer, "no face")


# ----------------------------------------------------------------------------- backends


def test_auto_backend_falls_back_to_dlib_without_insightface_files(tmp_path: Path) -> None:
    cfg = FaceConfig(backend="auto", insightface_root=str(tmp_path / "nothing-here"))
    assert resolve_backend(cfg) == "dlib"
    assert get_face_analyzer(cfg).name == "dlib"
    assert get_face_analyzer(cfg) is get_face_analyzer(cfg)  # one per process
    assert "dlib" in available_backends(cfg) and "insightface" not in available_backends(cfg)


def test_auto_backend_picks_insightface_when_its_files_exist(tmp_path: Path) -> None:
    (tmp_path / "buffalo_l").mkdir()
    (tmp_path / "buffalo_l" / "det_10g.onnx").write_bytes(b"")  # resolution only checks presence
    assert resolve_backend(FaceConfig(backend="auto", insightface_root=str(tmp_path))) == "insightface"


def test_explicit_insightface_without_files_says_where_and_how(tmp_path: Path) -> None:
    cfg = FaceConfig(backend="insightface", insightface_root=str(tmp_path))
    with pytest.raises(PhotoError) as caught:
        get_face_analyzer(cfg)
    message = str(caught.value)
    assert str(tmp_path / "buffalo_l") in message and "buffalo_l.zip" in message and "dlib" in message


def test_report_to_dict_is_json_friendly() -> None:
    report = PhotoReport(name="a.jpg", ok=True, backend="dlib", faces=1, box=(1, 2, 3, 4), score=1.5,
                         warnings=("w",), path="/x/a.jpg")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == "/x/a.jpg" and data["box"] == [1, 2, 3, 4] and data["warnings"] == ["w"]
    assert set(data) >= {"path", "name", "ok", "faces", "box", "score", "warnings", "error"}


# ----------------------------------------------------------------------------- command line


def test_cli_prepare_json_with_a_good_and_a_bad_file(faces_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "studio.cli_prepare", str(faces_dir / "single/f2d_0.jpg"), str(bad),
               "--json", "--out", str(out), "--preset", "tiny"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # exactly one JSON object, nothing else on stdout
    assert result["backend"] == "dlib"
    good, broken = result["photos"]
    assert set(good) == {"path", "ok", "faces", "box", "warnings", "error"}
    assert good["ok"] and good["faces"] == 1 and len(good["box"]) == 4 and good["path"].endswith("f2d_0.jpg")
    assert not broken["ok"] and "not an image" in broken["error"]
    assert result["identity_distances"] == [[0.0]]
    crop = Image.open(out / "00_f2d_0_crop.png")
    assert crop.size == (256, 256)  # the tiny preset's face.crop_size
    assert (out / "00_f2d_0_overlay.png").is_file() and (out / "00_f2d_0_mask.png").is_file()


def test_cli_prepare_fails_when_no_photo_is_usable(tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    done = subprocess.run([sys.executable, "-m", "studio.cli_prepare", str(bad), "--json", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["photos"][0]["ok"] is False and result["identity_distances"] == []
    assert "None of the photos" in done.stderr and "Traceback" not in done.stderr


def test_cli_prepare_refuses_an_unwritable_out_folder_before_any_face_work(tmp_path, faces_dir):
    import subprocess
    import sys

    not_a_folder = tmp_path / "crops"
    not_a_folder.write_text("a file where the folder should go")
    result = subprocess.run(
        [sys.executable, "-m", "studio", "prepare", str(faces_dir / "single" / "f2d_0.jpg"), "--out", str(not_a_folder)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "cannot write to --out" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- insightface code path


class StandInFaceAnalysis:
    """Stands in for ``insightface.app.FaceAnalysis``, whose ONNX models cannot be downloaded
    here: the same constructor, ``prepare`` and ``get`` (BGR in), and Face fields (``bbox``,
    ``det_score``, ``kps`` = eyes, nose tip, mouth corners as seen in the image,
    ``normed_embedding`` 512-D unit). Keypoints come from dlib's 68-point model; the embedding
    is dlib's descriptor through a fixed isometry (cosines kept)."""

    built: list[dict] = []

    def __init__(self, name: str, root: str, allowed_modules: list[str], providers: list[str]) -> None:
        import dlib

        from studio.faces import _face_recognition_models_dir

        models = _face_recognition_models_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._lift = np.linalg.qr(np.random.default_rng(0).standard_normal((512, 128)))[0].astype(np.float32)
        StandInFaceAnalysis.built.append({"name": name, "root": root, "modules": allowed_modules, "providers": providers})

    def prepare(self, ctx_id: int, det_size: tuple[int, int]) -> None:
        self.prepared = (ctx_id, det_size)

    def get(self, bgr: np.ndarray) -> list:
        from types import SimpleNamespace

        rgb = np.ascontiguousarray(bgr[..., ::-1])
        faces = []
        for rect in self._detector(rgb, 1):
            shape = self._shape(rgb, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
            kps = np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
            descriptor = np.asarray(self._encoder.compute_face_descriptor(rgb, shape), np.float32)
            embedding = self._lift @ descriptor
            faces.append(SimpleNamespace(
                bbox=np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32), det_score=0.9,
                kps=kps, normed_embedding=embedding / np.linalg.norm(embedding),
            ))
        return faces


def test_the_insightface_backend_aligns_masks_and_embeds_like_dlib(faces_dir: Path, tmp_path: Path, monkeypatch,
                                                                    prepared: dict[str, PreparedPhoto]) -> None:
    """With its model files present, the insightface path runs end to end: eyes level and
    centred in the crop, about the framing of dlib's crops (eye distance within 25 %: the two fit
    different landmark sets, so the scale follows each face's proportions; measured 0.78-1.16),
    a mask on the face, and unit 512-D embeddings that keep one person closer than another."""
    import insightface.app

    from studio import faces

    (tmp_path / "buffalo_l").mkdir()
    (tmp_path / "buffalo_l" / "det_10g.onnx").write_bytes(b"")  # presence is what the studio checks
    monkeypatch.setattr(insightface.app, "FaceAnalysis", StandInFaceAnalysis)
    monkeypatch.setattr(faces, "_ANALYZERS", {})
    cfg = FaceConfig(backend="auto", insightface_root=str(tmp_path))
    analyzer = get_face_analyzer(cfg)
    assert analyzer.name == "insightface" and StandInFaceAnalysis.built[-1]["name"] == str(tmp_path / "buffalo_l")
    assert StandInFaceAnalysis.built[-1]["providers"] == ["CPUExecutionProvider"]

    names = [NEWTON[0], NEWTON[1], SCARLETT[0]]
    result = prepare([faces_dir / name for name in names], cfg)
    assert result.backend == "insightface" and [r.backend for r in result.reports] == ["insightface"] * 3
    for name, photo in zip(names, result.photos):
        size = cfg.crop_size
        left_eye, right_eye = photo.landmarks[0], photo.landmarks[1]
        assert abs(left_eye[1] - right_eye[1]) < 0.02 * size, name  # level
        assert abs((left_eye[0] + right_eye[0]) / 2 - (size - 1) / 2) < 0.03 * size, name  # centred
        dlib_landmarks = prepared[name].landmarks
        dlib_eyes = np.linalg.norm(dlib_landmarks[0:2].mean(0) - dlib_landmarks[2:4].mean(0))
        assert np.linalg.norm(right_eye - left_eye) == pytest.approx(dlib_eyes, rel=0.25), name
        mask = photo.mask
        eye_row = int(round(left_eye[1]))
        assert mask[eye_row, int((left_eye[0] + right_eye[0]) / 2)] > 0.9 and mask[2, 2] < 0.1, name
        assert photo.embedding.shape == (512,) and np.linalg.norm(photo.embedding) == pytest.approx(1.0, abs=1e-5)
    same = analyzer.similarity(result.photos[0].embedding, result.photos[1].embedding)
    other = analyzer.similarity(result.photos[0].embedding, result.photos[2].embedding)
    assert same > other
