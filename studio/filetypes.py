"""One file sniffer: what an uploaded file is, from its first bytes, before anything decodes it.

Photo decoding (studio/photos.py) and concept files (studio/concept_file.py) both answer a
wrong file with what it is ("This file is a PDF document ..."), so they share this table.
Uploaded files are data: nothing here parses more than the first few bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

HEAD_BYTES = 64  # how much of a file sniff() needs


@dataclass(frozen=True)
class FileKind:
    """name: a short key ("png", "pickle", ...); description: for a sentence ("a PNG image")."""

    name: str
    description: str
    image: bool = False


_MAGIC: tuple[tuple[bytes, FileKind], ...] = (
    (b"\x89PNG", FileKind("png", "a PNG image", image=True)),
    (b"\xff\xd8\xff", FileKind("jpeg", "a JPEG image", image=True)),
    (b"GIF8", FileKind("gif", "a GIF image", image=True)),
    (b"BM", FileKind("bmp", "a BMP image", image=True)),
    (b"II*\x00", FileKind("tiff", "a TIFF image", image=True)),
    (b"MM\x00*", FileKind("tiff", "a TIFF image", image=True)),
    (b"RIFF", FileKind("riff", "a WEBP image or other RIFF file", image=True)),
    (b"PK\x03\x04", FileKind("zip", "a zip archive (an Office document, or a PyTorch .pt/.ckpt checkpoint, "
                                    "which is a zipped pickle)")),
    (b"%PDF", FileKind("pdf", "a PDF document")),
)
# Text formats, matched case-insensitively after leading white space.
_TEXT_MAGIC: tuple[tuple[bytes, FileKind], ...] = (
    (b"<!doctype html", FileKind("html", "a web page (HTML)")),
    (b"<html", FileKind("html", "a web page (HTML)")),
    (b"<?xml", FileKind("xml", "an XML or SVG file")),
    (b"<svg", FileKind("svg", "an SVG drawing")),
)
_HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftypheis")
HEIF = FileKind("heif", "a HEIC/AVIF photo", image=True)
PICKLE = FileKind("pickle", "a Python pickle (e.g. a .ckpt/.pt/.bin file)")
TEXT = FileKind("text", "a text file")


def _is_text(head: bytes) -> bool:
    """UTF-8 without control characters (a character cut off at the end of ``head`` is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return bool(text) and all(ch.isprintable() or ch in "\t\n\r" for ch in text)


def sniff(head: bytes) -> FileKind | None:
    """What a file starting with ``head`` (its first HEAD_BYTES bytes) is; None when unknown."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[4:12] in _HEIF_BRANDS:
        return HEIF
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return PICKLE
    stripped = head.lstrip().lower()
    for magic, kind in _TEXT_MAGIC:
        if stripped.startswith(magic):
            return kind
    return TEXT if _is_text(head[:HEAD_BYTES]) else None
