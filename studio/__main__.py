"""``python -m studio``: the command line (see :mod:`studio.cli`)."""
from __future__ import annotations

import os
import sys

# Library chatter (e.g. "requires torchvision, falling back") would bury the one-line errors;
# set before transformers / diffusers are imported. An explicit setting still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: shared CPUs

from studio.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
