"""Benchmarks on the full-size SD 1.5 architecture (random weights): training step, recipe time,
preview and slider latency, peak memory, achieved FLOP/s, and the CPU tiny end-to-end goal.

    .venv/bin/python bench/run.py --suite quick                 # this CPU, < 10 min
    python bench/run.py --suite full --device cuda --json out.json

Each figure is the median (``statistics.median``) of ``repeats`` runs after warm-up; the
variants of a section run round-robin (A, B, C, A, B, C, ...) so that load from other
processes hits them alike, and every ratio is taken between figures of the same run. Wall
and process CPU seconds are both recorded: CPU/wall well below the thread count means the
cores were shared. A section that fails prints its error and the suite goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from studio.backbone import quiet_loading  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # before --threads changes it
DEFAULT_PHOTO = REPO / "assets" / "examples" / "astronaut.png"  # ships with the repo (public domain)

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s, for the
# utilisation column; matched against torch.cuda.get_device_name(). A measured bf16 GEMM
# peak is reported beside it because clocks and power limits differ between machines.
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
)


# --------------------------------------------------------------------------- settings
@dataclass
class Suite:
    """What a suite measures and how often."""

    name: str
    resolution: int  # training side in pixels
    batches: tuple[int, ...]  # training batch sizes
    warmup: int  # untimed runs per variant (the first one counts FLOPs)
    repeats: int  # timed runs per variant -> median
    preview_resolution: int
    preview_steps: int | None  # None = the preset's sample.preview_steps
    preset: str = "sd15"
    recipe_micro_steps: int = 2000  # authors: 1000 optimiser steps x grad-accum 2, batch 1
    tiny_steps: int = 100
    cpu_threads: int | None = None  # torch.set_num_threads on CPU (None: torch's default)
    notes: list[str] = field(default_factory=list)


SUITES = {
    "quick": Suite(
        "quick", resolution=256, batches=(1,), warmup=1, repeats=3, preview_resolution=128, preview_steps=3,
        cpu_threads=1,
        notes=[
            "quick suite on CPU: 1 torch thread (--threads N to change). On a shared CPU, OpenMP threads "
            "spin-wait for each other and 2-thread timings swing 2-10x with other processes' load; "
            "one thread gives CPU seconds that compare across variants",
        ],
    ),
    "full": Suite("full", resolution=512, batches=(1, 2, 4), warmup=2, repeats=5, preview_resolution=512, preview_steps=None),
}

SECTIONS = ("train", "recipe", "preview", "tiny")
# Opt-in: FLOPs of one step at 512 px, untimed (minutes on a CPU; the GPU suite's train section
# counts them at 512 px anyway). Gives the FLOP/s the recipe-time goal needs.
EXTRA_SECTIONS = ("flops",)
RECIPE_GOAL_S = 90.0  # the goal for the authors' full recipe (1000 optimiser steps) on one H100


# --------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runs:
    """Wall and process-CPU seconds of the timed runs of one variant, and its peak memory."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # CPU: peak RSS of the process; CUDA: max_memory_allocated
    flops: int | None = None  # one run, counted in the first warm-up

    @property
    def median(self) -> float:
        return statistics.median(self.wall) if self.wall else math.nan

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "cpu_median_s": self.cpu_median,
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "peak_gib": self.peak_bytes / 2**30,
            "flops": self.flops,
        }


class PeakMemory:
    """Peak memory inside the block: CUDA ``max_memory_allocated``, else the process RSS polled every 10 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            process = psutil.Process()
            self.peak = process.memory_info().rss

            def poll() -> None:
                while not self._stop.wait(0.01):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)


@contextlib.contextmanager
def counting_flops() -> Iterator[Any]:
    """Count FLOPs of the block; the math SDPA kernel is forced so attention is counted
    (on CPU the flop counter misses the fused SDPA kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        yield counter


def run_round_robin(variants: dict[str, Callable[[], Any]], suite: Suite, device: torch.device,
                    count_flops: bool = True, log: Callable[[str], None] = print) -> dict[str, Runs]:
    """Warm up each variant, then time them in turns; returns Runs per variant name."""
    runs = {name: Runs() for name in variants}
    for name, fn in variants.items():
        for index in range(suite.warmup):
            started = time.perf_counter()
            if index == 0 and count_flops:
                with counting_flops() as counter:
                    fn()
                runs[name].flops = int(counter.get_total_flops())
            else:
                fn()
            synchronize(device)
            log(f"    warm-up {name}: {time.perf_counter() - started:.2f} s")
    for _ in range(suite.repeats):
        for name, fn in variants.items():
            with PeakMemory(device) as memory:
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                synchronize(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].wall.append(wall)
            runs[name].cpu.append(cpu)
            runs[name].peak_bytes = max(runs[name].peak_bytes, memory.peak)
            log(f"    {name}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    return runs


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        # PyTorch's defaults are kept (the reference's fp32 matmuls run in true fp32); recorded here.
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def measured_gemm_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 20) -> float:
    """Best achieved TFLOP/s of a square GEMM: a practical ceiling for this device and dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


# --------------------------------------------------------------------------- inputs
def training_photo(path: Path, side: int) -> tuple[Image.Image, np.ndarray]:
    """A square photo and a soft elliptic face mask (the mask's cost does not depend on its shape)."""
    if path.is_file():
        image = Image.open(path).convert("RGB")
        crop = min(image.size)
        image = image.crop(((image.width - crop) // 2, (image.height - crop) // 2,
                            (image.width + crop) // 2, (image.height + crop) // 2)).resize((side, side), Image.BICUBIC)
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:side, 0:side] / side
    distance = ((yy - 0.45) / 0.32) ** 2 + ((xx - 0.5) / 0.25) ** 2
    mask = np.clip((1.3 - distance) / 0.6, 0.0, 1.0).astype(np.float32)
    return image, mask


def untrained_concept(backbone, cfg):
    """A Concept with a fresh mapper and a random image embedding: costs what a trained one costs."""
    from studio.concept import Concept
    from studio.conditioning import super_category_id
    from studio.mapper import IdentityMapper

    slot = super_category_id(backbone.tokenizer, cfg.concept.super_category)
    class_embedding = backbone.text_encoder.get_input_embeddings().weight[slot].detach().float()
    mapper = IdentityMapper(
        class_embedding, cfg.concept.num_tokens, tuple(cfg.train.band), cfg.concept.num_anchors,
        cfg.concept.hidden_dim, cfg.concept.time_encoding_dim, backbone.image_embed_dim,
    ).to(backbone.device).eval().requires_grad_(False)
    embedding = None if backbone.image_embed_dim is None else torch.randn(backbone.image_embed_dim)
    return Concept(
        mapper=mapper, super_category=cfg.concept.super_category, train_band=tuple(cfg.train.band),
        late_stage=cfg.concept.late_stage, backbone=backbone.fingerprint(), image_embedding=embedding,
        config=cfg.to_dict(),
    )


# --------------------------------------------------------------------------- sections
class Bench:
    """Holds the shared backbone and the results; each ``section_*`` fills ``results[name]``."""

    def __init__(self, suite: Suite, device: str, photo: Path, dtype: str = "auto") -> None:
        self.suite, self.photo, self.dtype = suite, photo, dtype
        self.results: dict[str, Any] = {}
        self.lines: list[str] = []  # the printed table, for RESULTS.md
        from studio.backbone import resolve_device

        self.device = resolve_device(device)
        # GPU: measure each training variant's peak memory alone (see section_train).
        self.isolate_memory = self.device.type == "cuda"
        self._backbone = None

    # ---- output
    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
        lines = ["| " + " | ".join(str(x).ljust(w) for x, w in zip(header, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in rows]
        for line in lines:
            self.say(line)
        self.lines += lines + [""]

    # ---- the full-size backbone, built once
    @property
    def backbone(self):
        if self._backbone is None:
            from sd15 import build_sd15_backbone, describe

            started = time.perf_counter()
            with quiet_loading():
                self._backbone, seconds = build_sd15_backbone(str(self.device), self.dtype)
            self.results["backbone"] = {
                "build_s": time.perf_counter() - started,
                "parts_s": seconds,
                "parameters_m": describe(self._backbone),
                "dtype": str(self._backbone.dtype).removeprefix("torch."),
            }
            self.say(f"built SD 1.5-shaped backbone in {self.results['backbone']['build_s']:.1f} s: "
                     f"{self.results['backbone']['parameters_m']} M parameters, {self._backbone.describe()}")
        return self._backbone

    def preset(self, **overrides: Any):
        from studio.config import load_preset

        return load_preset(self.suite.preset, **overrides)

    # ---- 1. training step
    def section_train(self) -> None:
        from reference import RecipeSettings, ReferenceRecipe, TextualInversionStep

        suite, backbone = self.suite, self.backbone
        image, mask = training_photo(self.photo, suite.resolution)
        peak = None
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            peak = {"datasheet_bf16_tflops": datasheet_peak(name), "measured_bf16_gemm_tflops": measured_gemm_peak(self.device)}
            self.results["device_peak"] = peak
            self.say(f"device peak (bf16): datasheet {peak['datasheet_bf16_tflops']} TFLOP/s, "
                     f"measured GEMM {peak['measured_bf16_gemm_tflops']:.0f} TFLOP/s")
        per_batch: dict[str, Any] = {}
        rows = []
        for batch in suite.batches:
            self.say(f"  training step, {suite.resolution} px, batch {batch}")
            variants: dict[str, Callable[[], Any]] = {}
            try:
                ours = ours_trainer(backbone, image, mask, suite.resolution, batch, suite.preset)
                variants["ours"] = checked_step(ours.train_step)
            except Exception as exc:  # the trainer may not have landed: measure the rest
                self.say(f"    ours unavailable: {type(exc).__name__}: {exc}")
            reference = ReferenceRecipe(backbone, image, mask, RecipeSettings(
                batch_size=batch, grad_accum=1, resolution=suite.resolution))
            variants["reference"] = checked_step(reference.step)
            floor = TextualInversionStep(backbone, image, suite.resolution, batch_size=batch)
            variants["plain TI"] = checked_step(floor.step)
            runs = run_round_robin(variants, suite, self.device)
            if self.isolate_memory:
                # Round-robin peaks include the other variants' resident state (the reference's
                # fp32 module copies): measure each alone, dropping the reference after its turn.
                for name in ("reference", "ours", "plain TI"):
                    if name in variants:
                        with PeakMemory(self.device) as memory:
                            variants[name]()
                        runs[name].peak_bytes = memory.peak
                    if name == "reference":
                        del variants["reference"]
                        reference = None
                        free(self.device)
            per_batch[str(batch)] = {name: r.to_dict() for name, r in runs.items()}
            ref, ti = runs["reference"].median, runs["plain TI"].median
            for name, r in runs.items():
                tflops = r.flops / r.median / 1e12 if r.flops else None
                row = {
                    "batch": batch, "variant": name, "median_s": r.median, "cpu_median_s": r.cpu_median,
                    "samples_per_s": batch / r.median, "speedup_vs_reference": ref / r.median, "vs_plain_ti": r.median / ti,
                    "speedup_vs_reference_cpu": runs["reference"].cpu_median / r.cpu_median,
                    "vs_plain_ti_cpu": r.cpu_median / runs["plain TI"].cpu_median,
                    "tflop_per_step": r.flops / 1e12 if r.flops else None, "achieved_tflops": tflops,
                    "peak_gib": r.peak_bytes / 2**30,
                }
                if peak and tflops:
                    if peak["datasheet_bf16_tflops"]:
                        row["pct_datasheet_bf16_peak"] = 100 * tflops / peak["datasheet_bf16_tflops"]
                    row["pct_measured_gemm_peak"] = 100 * tflops / peak["measured_bf16_gemm_tflops"]
                per_batch[str(batch)][name].update(row)
                rows.append(row)
            del variants, reference, floor
            with contextlib.suppress(NameError):
                del ours
            free(self.device)
        self.results["train"] = per_batch
        memory = "peak GPU GiB (allocated, alone)" if self.device.type == "cuda" else "peak RSS GiB (process)"
        header = ["batch", "variant", "median s", "CPU s", "samples/s", "× faster than ref (CPU)", "× plain TI (CPU)", "TFLOP/step", "TFLOP/s"]
        if peak:
            header.append("% peak (sheet / GEMM)")
        header.append(memory)
        table = []
        for row in rows:
            line = [
                str(row["batch"]), row["variant"], f"{row['median_s']:.3f}", f"{row['cpu_median_s']:.2f}",
                f"{row['samples_per_s']:.3f}", f"{row['speedup_vs_reference']:.2f} ({row['speedup_vs_reference_cpu']:.2f})",
                f"{row['vs_plain_ti']:.2f} ({row['vs_plain_ti_cpu']:.2f})",
                fmt(row["tflop_per_step"], ".3f"), fmt(row["achieved_tflops"], ".2f"),
            ]
            if peak:
                line.append(f"{fmt(row.get('pct_datasheet_bf16_peak'), '.1f')} / {fmt(row.get('pct_measured_gemm_peak'), '.1f')}")
            line.append(f"{row['peak_gib']:.2f}")
            table.append(line)
        self.say()
        self.say(f"Training step ({suite.resolution} px, one optimiser step of `batch` samples, grad-accum 1):")
        self.table(header, table)

    # ---- 2. the authors' full recipe, extrapolated
    def section_recipe(self) -> None:
        train = self.results.get("train")
        if not train or "1" not in train:
            raise RuntimeError("needs the batch-1 training figures (section train)")
        micro = self.suite.recipe_micro_steps
        b1 = train["1"]
        estimates: dict[str, Any] = {}
        rows = []
        for name in ("reference", "ours"):
            if name not in b1:
                continue
            options = {f"batch 1 x accum 2: {micro} x step(b1)": micro * b1[name]["median_s"]}
            if name == "ours" and "2" in train and "ours" in train["2"]:
                options[f"batch 2 x accum 1: {micro // 2} x step(b2)"] = micro // 2 * train["2"]["ours"]["median_s"]
            best = min(options, key=options.get)
            estimates[name] = {"seconds": options[best], "how": best, "options": options}
            rows.append([name, best, f"{options[best]:.0f}", f"{options[best] / 60:.1f}"])
        if "ours" in estimates:
            estimates["speedup"] = estimates["reference"]["seconds"] / estimates["ours"]["seconds"]
            rows.append(["ref / ours", "", f"{estimates['speedup']:.2f}×", ""])
        if self.device.type == "cuda" and "ours" in estimates:
            gpu = torch.cuda.get_device_name(self.device)
            estimates["goal"] = {"seconds": RECIPE_GOAL_S, "device": gpu, "met": estimates["ours"]["seconds"] <= RECIPE_GOAL_S,
                                 "applies": "H100" in gpu and self.suite.resolution == 512}
            rows.append([f"goal (H100, 512 px)", "", f"<= {RECIPE_GOAL_S:.0f}",
                         ("met" if estimates["goal"]["met"] else "NOT met") + ("" if estimates["goal"]["applies"] else " (not an H100 / 512 px run)")])
        self.results["recipe"] = estimates
        self.say()
        self.say(f"The authors' full recipe ({micro} samples = 1000 optimiser steps of 2), extrapolated "
                 f"from the {self.suite.resolution} px steps above (optimiser cost per extra step ignored):")
        self.table(["", "how", "seconds", "minutes"], rows)

    # ---- FLOPs at 512 px (opt-in)
    def section_flops(self, resolution: int = 512) -> None:
        from reference import RecipeSettings, ReferenceRecipe, TextualInversionStep

        backbone = self.backbone
        image, mask = training_photo(self.photo, resolution)
        builders = {
            ("ours", 1): lambda: ours_trainer(backbone, image, mask, resolution, 1, self.suite.preset).train_step,
            ("ours", 2): lambda: ours_trainer(backbone, image, mask, resolution, 2, self.suite.preset).train_step,
            ("reference", 1): lambda: ReferenceRecipe(backbone, image, mask, RecipeSettings(batch_size=1, grad_accum=1, resolution=resolution)).step,
            ("plain TI", 1): lambda: TextualInversionStep(backbone, image, resolution).step,
        }
        counts: dict[str, Any] = {}
        rows = []
        for (name, batch), build in builders.items():
            step = checked_step(build())
            started = time.perf_counter()
            with counting_flops() as counter:
                step()
            flops = int(counter.get_total_flops())
            recipe = flops * self.suite.recipe_micro_steps / batch
            counts[f"{name} b{batch}"] = {"flops_per_step": flops, "flops_per_sample": flops / batch, "recipe_flops": recipe,
                                          "tflops_needed_for_goal": recipe / RECIPE_GOAL_S / 1e12}
            rows.append([name, str(batch), f"{flops / 1e12:.3f}", f"{flops / batch / 1e12:.3f}", f"{recipe / 1e15:.2f}",
                         f"{recipe / RECIPE_GOAL_S / 1e12:.1f}"])
            self.say(f"    counted {name} b{batch} in {time.perf_counter() - started:.0f} s")
            del step
            free(self.device)
        self.results["flops"] = {"resolution": resolution, "counts": counts}
        self.say()
        self.say(f"FLOPs of one training step at {resolution} px (torch.utils.flop_counter, math attention), and the "
                 f"sustained TFLOP/s the recipe ({self.suite.recipe_micro_steps} samples) needs to finish in {RECIPE_GOAL_S:.0f} s:")
        self.table(["variant", "batch", "TFLOP/step", "TFLOP/sample", "recipe PFLOP", f"TFLOP/s for {RECIPE_GOAL_S:.0f} s"], rows)

    # ---- 3. previews and slider re-render
    def section_preview(self) -> None:
        from diffusers import StableDiffusionPipeline
        from studio.sampler import SCHEDULERS, GenerationSettings, Sampler

        backbone, suite = self.backbone, self.suite
        cfg = self.preset()
        sample = cfg.sample
        steps = suite.preview_steps or sample.preview_steps
        side = suite.preview_resolution
        prompts = list(sample.preview_prompts)[:4]
        concept = untrained_concept(backbone, cfg)
        sampler = Sampler(backbone)
        preview = GenerationSettings.from_config(sample, preview=True, num_inference_steps=steps, height=side, width=side,
                                                 seeds=[0])
        band0 = tuple(sample.band)
        state = {"band": 0, "balance": 0}

        def first_preview() -> None:  # a concept the cache has never seen (e.g. after a training step)
            sampler.clear_cache()
            sampler(concept, prompts, **dataclasses.replace(preview, band=band0, balance=1.0).kwargs())

        def band_moved() -> None:  # the band slider moved: a band never used before, same concept
            state["band"] += 1
            sampler(concept, prompts, **dataclasses.replace(preview, band=(band0[0] - 7 * state["band"], band0[1]), balance=1.0).kwargs())

        def balance_moved(target: str = "unet") -> None:  # the balance slider moved to a value never used before
            state["balance"] += 1
            sampler(concept, prompts, **dataclasses.replace(preview, band=band0, balance=1.0 - 0.01 * state["balance"],
                                                            balance_target=target).kwargs())

        pipe = StableDiffusionPipeline(
            vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
            scheduler=SCHEDULERS[sample.scheduler](backbone.noise_scheduler.config), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        plain_prompts = [p.replace("{}", cfg.concept.super_category) for p in prompts]

        def diffusers_pipeline() -> None:
            pipe(
                prompt=plain_prompts, negative_prompt=[sample.negative_prompt] * len(prompts), num_inference_steps=steps,
                guidance_scale=sample.guidance_scale, height=side, width=side,
                generator=[torch.Generator("cpu").manual_seed(0) for _ in prompts], output_type="pil",
            )

        variants = {
            "diffusers pipeline": diffusers_pipeline,
            "ours: first preview": first_preview,
            "ours: band moved": band_moved,
            "ours: balance moved": balance_moved,  # gamma on the UNet's keys (the default): no text encoding
            "ours: balance moved, in the text encoder": lambda: balance_moved("text_encoder"),
        }
        self.say(f"  previews: {len(prompts)} images at {side} px, {steps} steps, CFG {sample.guidance_scale}, {sample.scheduler}")
        calls_before = sampler.text_encoder_calls
        with torch.inference_mode():
            runs = run_round_robin(variants, suite, self.device, count_flops=False)
        floor = runs["diffusers pipeline"].median
        floor_cpu = runs["diffusers pipeline"].cpu_median
        result = {name: {**r.to_dict(), "vs_pipeline": r.median / floor, "vs_pipeline_cpu": r.cpu_median / floor_cpu}
                  for name, r in runs.items()}
        result["settings"] = {"images": len(prompts), "resolution": side, "steps": steps, "guidance": sample.guidance_scale,
                              "scheduler": sample.scheduler, "text_encoder_calls": sampler.text_encoder_calls - calls_before}
        self.results["preview"] = result
        memory = "peak GPU GiB (allocated)" if self.device.type == "cuda" else "peak RSS GiB (process)"
        rows = [[name, f"{r.median:.3f}", f"{r.cpu_median:.2f}", f"{r.median / floor:.3f} ({r.cpu_median / floor_cpu:.3f})",
                 f"{r.peak_bytes / 2**30:.2f}"] for name, r in runs.items()]
        self.say()
        self.say(f"Preview latency ({len(prompts)} previews at {side} px, {steps} steps, request -> PIL images):")
        self.table(["variant", "median s", "CPU s", "× diffusers pipeline (CPU)", memory], rows)

    # ---- 6. CPU tiny end to end
    def section_tiny(self) -> None:
        """Prepare a photo + N training steps + 4 previews on the tiny preset, at the process's
        default thread count and, if that is more than one, again on one thread (small ops on a shared
        CPU lose more to OpenMP spin-waiting than they gain from a second thread)."""
        from studio.backbone import get_backbone
        from studio.config import load_preset

        cfg = load_preset("tiny")
        started = time.perf_counter()
        with quiet_loading():
            backbone = get_backbone(cfg.model)
        load_s = time.perf_counter() - started
        threads = torch.get_num_threads()
        runs = {}
        for count in dict.fromkeys((DEFAULT_THREADS, 1)):
            torch.set_num_threads(count)
            try:
                runs[f"{count} thread{'s' if count > 1 else ''}"] = self._tiny_once(cfg, backbone)
            finally:
                torch.set_num_threads(threads)
        self.results["tiny"] = {"backbone_load_s": load_s, "runs": runs, "goal_s": 60.0}
        names = list(next(iter(runs.values()))["parts_s"])
        rows = [[name] + [f"{run['parts_s'][name]:.2f}" for run in runs.values()] for name in names]
        rows.append(["total (prepare + steps + previews)"] + [
            f"{run['total_s']:.2f} (CPU {run['cpu_s']:.2f}) {'met' if run['total_s'] <= 60 else 'NOT met'}" for run in runs.values()])
        self.say()
        self.say(f"CPU tiny preset, end to end (goal <= 60 s; backbone load {load_s:.2f} s once per process, not counted):")
        self.table(["part", *runs], rows)

    def _tiny_once(self, cfg, backbone) -> dict[str, Any]:
        from studio.faces import prepare
        from studio.trainer import Trainer, TrainingPhoto

        times: dict[str, float] = {}
        cpu_started = time.process_time()
        wall_started = mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            times[name], mark = now - mark, now

        prepared = prepare([self.photo], cfg.face)
        lap("prepare photo (faces.prepare)")
        trainer = Trainer(backbone, cfg, [TrainingPhoto.from_prepared(p) for p in prepared.photos])
        lap("trainer setup (latents, embeddings)")
        for _ in range(self.suite.tiny_steps):
            trainer.train_step()
        lap(f"{self.suite.tiny_steps} training steps")
        preview = trainer.preview()
        lap(f"previews ({len(preview.images)} images, {cfg.sample.preview_steps} steps)")
        total = time.perf_counter() - wall_started
        return {"parts_s": times, "total_s": total, "cpu_s": time.process_time() - cpu_started, "met": total <= 60.0}


# --------------------------------------------------------------------------- helpers
def ours_trainer(backbone, image, mask, resolution: int, batch: int = 1, preset: str = "sd15"):
    """The studio's Trainer as the benchmarks time it: ``preset``'s recipe at ``resolution``,
    ``batch`` samples per optimiser step, no gradient accumulation."""
    from studio.config import load_preset
    from studio.trainer import Trainer, TrainingPhoto

    cfg = load_preset(preset, **{"train.batch_size": batch, "train.grad_accum": 1, "train.resolution": resolution})
    return Trainer(backbone, cfg, [TrainingPhoto(image, mask)])


def checked_step(step: Callable[[], Any]) -> Callable[[], None]:
    """``step`` that fails loudly unless it made a full, finite update: a rolled-back (NaN)
    step of the trainer skips the backward pass and would time as a bogus fast step."""

    def run() -> None:
        outcome = step()
        loss = getattr(outcome, "loss", outcome)
        if not isinstance(loss, float) or not math.isfinite(loss):
            raise RuntimeError(f"{getattr(step, '__qualname__', step)} did not make a finite update: {outcome!r}")

    return run


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS + EXTRA_SECTIONS)} (default: all but {', '.join(EXTRA_SECTIONS)})")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--resolution", type=int, help="override the training resolution")
    parser.add_argument("--batches", help="override the training batch sizes, e.g. 1,4")
    parser.add_argument("--repeats", type=int, help="override the timed runs per figure")
    parser.add_argument("--preview-resolution", type=int)
    parser.add_argument("--preview-steps", type=int)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype of the backbone (auto: as the studio picks: bf16/fp16 on GPU, bf16 on AMX CPUs, else fp32)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's choice)")
    args = parser.parse_args(argv)

    suite = dataclasses.replace(SUITES[args.suite], notes=list(SUITES[args.suite].notes))
    for key, value in (("resolution", args.resolution), ("repeats", args.repeats),
                       ("preview_resolution", args.preview_resolution), ("preview_steps", args.preview_steps)):
        if value is not None:
            setattr(suite, key, value)
            suite.notes.append(f"override: {key} = {value}")
    if args.batches:
        suite.batches = tuple(int(b) for b in args.batches.split(","))
        suite.notes.append(f"override: batches = {suite.batches}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    bench = Bench(suite, args.device, args.photo, args.dtype)
    threads = args.threads or (suite.cpu_threads if bench.device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.dtype != "auto":
        suite.notes.append(f"override: backbone dtype = {args.dtype} (the reference recipe stays fp32)")
    env = environment(bench.device)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bench.say(f"{command}\n{json.dumps(env)}")
    preview_steps = suite.preview_steps or "the preset's"
    bench.say(f"NOTE: suite {suite.name}: training at {suite.resolution} px, batches {list(suite.batches)}, "
              f"{suite.warmup} warm-up + median of {suite.repeats} runs; previews at {suite.preview_resolution} px "
              f"with {preview_steps} denoising steps" + ("" if suite.name == "full" else " (the full suite: 512 px, batches 1/2/4, the preset's steps)"))
    for note in suite.notes:
        bench.say(f"NOTE: {note}")
    started = time.perf_counter()
    errors: dict[str, str] = {}
    for section in sections:
        bench.say(f"\n== {section} ==")
        section_started = time.perf_counter()
        try:
            getattr(bench, f"section_{section}")()
        except Exception as exc:  # report and go on: one missing module must not hide the rest
            errors[section] = f"{type(exc).__name__}: {exc}"
            bench.say(f"SECTION {section} FAILED: {errors[section]}")
            traceback.print_exc(limit=6)
        bench.say(f"({section}: {time.perf_counter() - section_started:.0f} s; load average {os.getloadavg()[0]:.1f})")
        free(bench.device)
    total = time.perf_counter() - started
    rss = psutil.Process().memory_info().rss
    bench.say(f"\nsuite {suite.name} done in {total:.0f} s; process RSS now {rss / 2**30:.2f} GiB")
    if args.json:
        payload = {
            "id": uuid.uuid4().hex, "command": command, "environment": env, "suite": dataclasses.asdict(suite),
            "results": bench.results, "errors": errors, "total_s": total, "table": bench.lines,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        bench.say(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
