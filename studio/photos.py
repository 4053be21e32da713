"""Safe photo decoding (docs/FACES.md): any upload becomes an RGB image of bounded size, or a
:class:`PhotoError` with a plain sentence. Sizes are checked before anything is allocated
(file bytes, then decoded pixels); EXIF rotation is applied; every mode becomes RGB with a
warning where that changes what the photo shows. What a wrong file is comes from the one file
sniffer, studio/filetypes.py.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError
from studio.filetypes import HEAD_BYTES, HEIF, TEXT, sniff

log = logging.getLogger(__name__)

PhotoSource = str | Path | bytes | Image.Image

# Decoded pixels we accept before refusing a photo: ~50 MP is a large phone photo; a 12-bit
# RGBA PNG this size already takes 200 MB. JPEGs are decoded at 1/2..1/8 scale first (draft),
# so only their reduced size counts.
MAX_DECODE_PIXELS = 50_000_000
# Files larger than this are refused before reading (no photo needs 200 MB).
MAX_FILE_BYTES = 200_000_000
# Transparent pixels are composited on this colour (white: what a cut-out portrait
# usually sits on, and what a person expects to see in the crop).
ALPHA_BACKGROUND = (255, 255, 255)

class PhotoError(StudioError, ValueError):
    """A photo cannot be used; ``str(err)`` is a sentence a non-expert understands.

    ``report`` (one photo) or ``reports`` (all photos, from ``studio.faces.prepare``) are
    ``studio.faces.PhotoReport``s: what was learned about the photos, so nothing is lost when
    the error is shown. (Typed loosely: decoding sits below face preparation.)
    """

    def __init__(self, message: str, report: Any = None, reports: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.report = report
        self.reports = reports


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class DecodedPhoto:
    image: Image.Image  # RGB, at most max_pixels
    original_size: tuple[int, int]  # (width, height) after EXIF rotation, before any downscale
    warnings: list[str]


_NOT_A_PHOTO = "Please use a JPEG, PNG or WebP photo."


def _describe_unreadable(head: bytes) -> str:
    """A sentence for a file PIL cannot identify, from its first bytes."""
    kind = sniff(head)
    if kind is HEIF:
        return ("This is a HEIC/AVIF photo, which cannot be read here. Export or save it as JPEG "
                "(on an iPhone: Settings > Camera > Formats > Most Compatible) and try again.")
    if kind is not None and kind.image:
        return ("This image file is damaged or incomplete and cannot be read. Re-export or "
                "upload the original file again.")
    if kind is TEXT:
        return f"This file is not an image: it contains text. {_NOT_A_PHOTO}"
    if kind is not None:
        return f"This file is not an image: it is {kind.description}. {_NOT_A_PHOTO}"
    return f"This file is not an image or is in a format that cannot be read. {_NOT_A_PHOTO}"


def _too_large(pixels: int, limit: int = MAX_DECODE_PIXELS) -> PhotoError:
    return PhotoError(
        f"This image is too large to open safely ({pixels / 1e6:.0f} megapixels; the limit is "
        f"{limit / 1e6:.0f}). Resize it, e.g. to 4000 pixels on the longest side, and try again."
    )


def _open(source: PhotoSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise PhotoError("This file is empty (0 bytes). Upload the photo again.")
        fp: Any = io.BytesIO(data)
    else:
        path = Path(source)
        if not path.is_file():
            raise PhotoError(f"The file {path.name or str(path)!r} does not exist or is not a file.")
        try:
            size = path.stat().st_size
            data = path.read_bytes() if 0 < size <= MAX_FILE_BYTES else b""
        except OSError as exc:
            raise PhotoError(f"The file {path.name!r} cannot be read ({exc.strerror or type(exc).__name__}).") from None
        if size == 0:
            raise PhotoError("This file is empty (0 bytes). Upload the photo again.")
        if size > MAX_FILE_BYTES:
            raise PhotoError(f"This file is too large ({size / 1e6:.0f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB). "
                             "Resize or re-save it as a JPEG and try again.")
        # Read whole (above): PIL then holds no open file handle (animated files keep theirs open).
        fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces PIL's warning; its hard error is handled here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(int(match.group(1)) if match else 2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    except UnidentifiedImageError:
        raise PhotoError(_describe_unreadable(fp.getvalue()[:HEAD_BYTES])) from None


def _to_rgb(image: Image.Image, warnings_out: list[str]) -> Image.Image:
    """Any PIL mode -> RGB; a warning for each conversion that changes what the photo shows."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            warnings_out.append("The transparent background was filled with white.")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        warnings_out.append("Converted from CMYK (print) colours to RGB; colours may look slightly different.")
        return image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16-bit / 32-bit grey: PIL's convert clips to 0..255, so rescale the range ourselves.
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        if mode == "F" and values.max() <= 1.0:
            top = 1.0
        grey = (values / top * 255.0).clip(0, 255).round().astype(np.uint8)
        warnings_out.append("Converted a 16-bit black-and-white image to 8-bit; the learned face will have no colour.")
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("L", "1") and not image.info.get("reduced_from_16_bit"):
        warnings_out.append("This is a black-and-white photo; the learned face will have no skin or hair colour.")
        return image.convert("RGB")
    if mode == "P":
        warnings_out.append("This image has a limited colour palette (like a GIF); the photo quality may be low.")
        return image.convert("RGB")
    return image.convert("RGB")  # YCbCr, LAB, HSV, ...: plain colour conversions


def _reduce(image: Image.Image, max_pixels: int, notes: list[str]) -> Image.Image:
    """Shrink a decoded photo by a whole factor (box average) before any conversion, so that
    no full-size copy in another mode (RGB, float) is ever made; the final resize is done later.
    16-bit grey goes straight to 8-bit here (PIL cannot reduce it; numpy averages in float32)."""
    pixels = image.width * image.height
    factor = math.isqrt(pixels // max_pixels) if pixels > max_pixels else 1
    if factor < 2 or image.mode in ("P", "1"):
        return image
    if image.mode.startswith("I;16"):
        values = np.asarray(image)
        h, w = values.shape[0] // factor * factor, values.shape[1] // factor * factor
        blocks = values[:h, :w].reshape(h // factor, factor, w // factor, factor)
        small = blocks.mean(axis=(1, 3), dtype=np.float32) * np.float32(255.0 / 65535.0)
        notes.append("Converted a 16-bit black-and-white image to 8-bit; the learned face will have no colour.")
        reduced = Image.fromarray(small.round().clip(0, 255).astype(np.uint8))
        reduced.info.update(image.info)
        reduced.info["reduced_from_16_bit"] = True
        return reduced
    reduced = image.reduce(factor)
    reduced.info.update(image.info)
    return reduced


def decode_photo(source: PhotoSource, max_pixels: int) -> DecodedPhoto:
    """Decode ``source`` safely into an RGB image of at most ``max_pixels``; raises PhotoError."""
    notes: list[str] = []
    image = _open(source)
    width, height = image.size
    if getattr(image, "is_animated", False):
        frames = getattr(image, "n_frames", 2)
        if image.format == "TIFF":
            notes.append(f"This TIFF file has {frames} pages; only the first page is used.")
        else:
            notes.append(f"This is an animated image ({frames} frames); only the first frame is used.")
        image.seek(0)
    if image.format == "JPEG" and width * height > max_pixels:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: huge photos never exist in
        # memory at full size. draft keeps the result >= the requested size; asking for half
        # of max_pixels lets a 12 MP photo decode at 1/2 scale (3 MP) with no resize after.
        shrink = math.sqrt(max_pixels / 2 / (width * height))
        image.draft(None, (max(1, int(width * shrink)), max(1, int(height * shrink))))
    if image.width * image.height > MAX_DECODE_PIXELS:
        raise _too_large(width * height)
    try:
        image.load()
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise PhotoError("This image file is incomplete (it was cut off, e.g. by an interrupted "
                             "download or upload). Upload the complete file again.") from None
        raise PhotoError("This image file is damaged and cannot be read. Re-export or upload the "
                         "original file again.") from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError):
        raise PhotoError("This image file is damaged and cannot be read. Re-export or upload the "
                         "original file again.") from None
    image = _reduce(image, max_pixels, notes)
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: width and height swap
            width, height = height, width
        if orientation not in (None, 1):  # exif_transpose copies the image even when upright
            image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the photo
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
    image = _to_rgb(image, notes)
    if image.width * image.height > max_pixels:
        shrink = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * shrink)), max(1, int(image.height * shrink)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return DecodedPhoto(image, (width, height), notes)


def load_photo(source: PhotoSource, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """Decode a photo safely: EXIF rotation applied, any mode converted to RGB, at most
    ``max_pixels`` (huge JPEGs are decoded at reduced scale). Returns the RGB image (its
    ``info["original_size"]`` is the full (width, height)) and warnings; raises PhotoError."""
    loaded = decode_photo(source, max_pixels)
    loaded.image.info["original_size"] = loaded.original_size
    return loaded.image, loaded.warnings
