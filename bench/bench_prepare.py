"""Time face preparation (studio.faces.prepare) per photo on this machine.

Makes a ~1-megapixel and a ~12-megapixel JPEG by resizing a real photo from the shared
faces folder ($STUDIO_FACES_DIR or ../shared/data/faces), then prints the median time of a
few runs after a warm-up, and the ratio between them. Goal: < 1 s and < 3 s on a CPU.

    .venv/bin/python bench/bench_prepare.py [--runs 5] [--photo single/persona_person_1.jpg]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.config import FaceConfig  # noqa: E402
from studio.faces import get_face_analyzer, prepare  # noqa: E402

FACES_DIR = Path(os.environ.get("STUDIO_FACES_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "faces")
# (label, width, height): a 1 MP photo and a 12 MP (4000 x 3000) phone photo
SIZES = [("1 MP", 1152, 864), ("12 MP", 4000, 3000)]


def make_jpeg(photo: Image.Image, width: int, height: int) -> bytes:
    """``photo`` resized to cover width x height (centre crop), as JPEG bytes (quality 90)."""
    scale = max(width / photo.width, height / photo.height)
    resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    buffer = io.BytesIO()
    resized.crop((left, top, left + width, top + height)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def time_prepare(data: bytes, cfg: FaceConfig, runs: int) -> float:
    """Median seconds of prepare([data]) over ``runs`` runs, after one warm-up run."""
    analyzer = get_face_analyzer(cfg)
    prepare([data], cfg, analyzer)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        prepare([data], cfg, analyzer)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--photo", default="single/persona_person_1.jpg", help="photo inside the faces folder")
    args = parser.parse_args()
    source = FACES_DIR / args.photo
    if not source.is_file():
        print(f"missing {source}: set STUDIO_FACES_DIR to the shared faces folder", file=sys.stderr)
        return 1
    photo = Image.open(source).convert("RGB")
    cfg = FaceConfig(backend="dlib")
    print(f"prepare() per photo, backend dlib, crop {cfg.crop_size}px, max_pixels {cfg.max_pixels:,}, "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), median of {args.runs} after warm-up")
    medians = {}
    for label, width, height in SIZES:
        data = make_jpeg(photo, width, height)
        medians[label] = time_prepare(data, cfg, args.runs)
        print(f"  {label:>6} ({width}x{height} JPEG, {len(data) / 1e6:.1f} MB): {medians[label]:.3f} s")
    small, large = (medians[label] for label, *_ in SIZES)
    print(f"  ratio 12 MP / 1 MP: {large / small:.2f}x  (goal: < 1 s and < 3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
