"""What-if probes for bench/RESULTS-toy.md, section 3c: ``bench/toy_band.py`` with one change to
the studio patched in for the run, to see whether it would be worth a setting.

    python bench/toy_band_probe.py --rec-floor 1.0 -- --identities 12 --bands 300-800 --against ONE/per-identity.csv
    python bench/toy_band_probe.py --crop-eye-height 0.473 -- --identities 12 --bands 300-800 --set face.margin=1.0

``--rec-floor F`` weighs the reconstruction loss ``F + (1 - F) * face mask`` (1: the whole picture,
as the textual-inversion baseline does; the studio uses the mask alone, F = 0).
``--crop-eye-height H`` puts the eyes of the toy face step's crop at ``H`` of its height instead of
the canonical 0.42 (the world's own selfies have them at 0.473 on average).
Everything after ``--`` goes to bench/toy_band.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def patch_reconstruction_floor(floor: float) -> None:
    from studio import trainer

    init_latents = trainer.Trainer._init_latents

    def _init_latents(self) -> None:
        init_latents(self)
        self.rec_weights = floor + (1.0 - floor) * self.masks

    trainer.Trainer._init_latents = _init_latents


def patch_crop_eye_height(height: float) -> None:
    import numpy as np

    from studio.face_analyzer import AlignedFace, apply_affine, outside_of_photo
    from studio.toy import instruments
    from studio.toy import models as toy_models

    def align(self, rgb, face, size: int, margin: float) -> AlignedFace:
        matrix = toy_models.alignment_matrix(face.landmarks[0], face.landmarks[1], size, 1.0 / (1.0 + margin))
        matrix[1, 2] += (height - toy_models.CANONICAL_EYES[0][1]) * size  # the same crop, moved up the photo
        outside, _ = outside_of_photo(matrix, rgb.shape[:2], size)
        return AlignedFace(toy_models.warp(rgb, matrix, size), apply_affine(matrix, face.landmarks),
                           float(np.hypot(matrix[0, 0], matrix[0, 1])), outside)

    instruments.ToyFaceAnalyzer.align = align


def main() -> int:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rec-floor", type=float, help="reconstruction weight outside the face mask, 0-1")
    parser.add_argument("--crop-eye-height", type=float, help="eye height in the toy face step's crop, 0-1")
    args = parser.parse_args(own)
    if (args.rec_floor is None) == (args.crop_eye_height is None):
        parser.error("give one probe: --rec-floor or --crop-eye-height")
    if args.rec_floor is not None:
        if not 0.0 <= args.rec_floor <= 1.0:
            parser.error(f"--rec-floor must be in [0, 1], got {args.rec_floor}")
        patch_reconstruction_floor(args.rec_floor)
    else:
        if not 0.0 < args.crop_eye_height < 1.0:
            parser.error(f"--crop-eye-height must be in (0, 1), got {args.crop_eye_height}")
        patch_crop_eye_height(args.crop_eye_height)
    import toy_band

    sys.argv = ["toy_band.py", *rest]
    return toy_band.main()


if __name__ == "__main__":
    sys.exit(main())
