"""Load time and peak memory of the backbone: diffusers folder vs single-file checkpoint.

    .venv/bin/python bench/load_layouts.py            # small random SD-1.x-shaped model
    .venv/bin/python bench/load_layouts.py --full     # the full-size SD 1.5 architecture (~8 GB of disk)

Writes the model once in both layouts (the single file in the original LDM key layout, loaded
with the shipped assets/sd15-config for --full), then loads each layout ``--repeat`` times in a
fresh process, alternating, and reports wall seconds and the child's peak RSS (VmHWM), with
an import-only process as the floor. Figures go to stdout as JSON lines; the CPU model from lscpu
is printed with them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

CHILD = """
def peak_rss_mb():  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import json, sys, time
start = time.perf_counter()
from studio.backbone import build_backbone, quiet_loading
from studio.config import ModelConfig
imported = time.perf_counter()
source, config = sys.argv[1], sys.argv[2] or None
if source != "-":
    with quiet_loading():
        build_backbone(ModelConfig(source=source, single_file_config=config, image_encoder=None, device="cpu", dtype="float32"))
end = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": end - imported,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return "unknown"


def write_model(root: Path, full: bool) -> tuple[Path, Path, str]:
    from safetensors.torch import save_file

    from model_layouts import ldm_checkpoint, write_folder

    if full:
        from bench.sd15 import build_sd15_backbone

        backbone, _ = build_sd15_backbone(device="cpu", dtype="float32")
        parts = {"text_encoder": backbone.text_encoder, "unet": backbone.unet, "vae": backbone.vae}
        config = ""  # the shipped assets/sd15-config
    else:
        from studio.backbone import tiny_components

        parts = tiny_components(0)
        config = str(root / "folder")
    folder = write_folder(parts, root / "folder")
    single = root / "model.safetensors"
    save_file(ldm_checkpoint(parts), str(single))
    return folder, single, config


def run_child(source: str, config: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, source, config], cwd=REPO, capture_output=True, text=True,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size SD 1.5 architecture")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"cpu": cpu_model(), "model": "sd15-full" if args.full else "small"}))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder, single, config = write_model(Path(tmp), args.full)
        print(json.dumps({"write_s": round(time.perf_counter() - started, 1),
                          "single_file_mb": round(single.stat().st_size / 2**20)}))
        runs = {"imports only": ("-", ""), "folder": (str(folder), ""), "single file": (str(single), config)}
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, (source, cfg) in runs.items():
                results[name].append(run_child(source, cfg))
        for name, samples in results.items():
            loads = sorted(s["load_s"] for s in samples)
            peaks = sorted(s["peak_rss_mb"] for s in samples)
            print(json.dumps({"layout": name, "load_s_median": round(loads[len(loads) // 2], 2),
                              "peak_rss_mb_median": round(peaks[len(peaks) // 2]), "runs": len(samples)}))


if __name__ == "__main__":
    main()
