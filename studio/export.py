"""Export a concept for other tools: A1111/Forge, ComfyUI and diffusers (docs/EXPORT.md).

No other tool can run the mapper, so the band is cut into a few segments and the mapper is
evaluated once per segment: each segment becomes a plain textual-inversion file (one tensor
``emb_params`` of shape (K, D)). The stage table then travels as each tool's own way of
switching text over the denoising steps:

* A1111/Forge: nested prompt editing ``[from:to:when]``; ``when`` is a fraction of the step
  count, and A1111 switches on the step index, so the fractions are computed from the step
  table of the sampler and step count the user picks.
* ComfyUI: one ``CLIPTextEncode`` per segment, each limited by ``ConditioningSetTimestepRange``
  to the percents of its timestep interval (ComfyUI turns a percent p into the noise level of
  timestep ``(1 - p) * 999`` of the model's schedule, so the switch happens at the same t
  whatever sampler runs).
* diffusers: a short script that loads the files with ``load_textual_inversion`` and switches
  the prompt embeddings per step in ``callback_on_step_end``.

What cannot travel: the image bypass (values of the cross-attention moved by the reference
photo), the continuous time dependence inside a segment, and the tandem balance.
"""
from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from studio.errors import StudioError
from studio.concept import Concept
from studio.conditioning import PLACEHOLDER, Stage, check_prompt
from studio.config import DEFAULT_NEGATIVE_PROMPT, NUM_TRAIN_TIMESTEPS, check_band

if TYPE_CHECKING:
    from studio.backbone import Backbone

FORMATS = ("a1111", "comfyui", "diffusers", "all")
MAX_SEGMENTS = 8
EMBEDDING_KEY = "emb_params"  # the one tensor name A1111, kohya and ComfyUI all read
# ComfyUI's discrete SD schedules: percent p <-> timestep (1 - p) * LAST_TIMESTEP.
LAST_TIMESTEP = NUM_TRAIN_TIMESTEPS - 1
DIFFUSERS_SCRIPT = Path(__file__).with_name("export_script.py")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class ExportError(StudioError, ValueError):
    """An export setting is invalid; the message says what is allowed."""


@dataclass(frozen=True)
class Segment:
    """One stretch of denoising with one text condition: timesteps ``t_low <= t <= t_high``.

    The edges are half-integers, so no integer timestep lies on one. ``embedding`` is the
    trigger word of its textual-inversion file, or None for the super-category word;
    ``mapper_timestep`` the timestep the mapper was evaluated at (None for the word).
    """

    embedding: str | None
    t_low: float
    t_high: float
    mapper_timestep: int | None = None

    def covers(self, t: float) -> bool:
        return self.t_low <= t <= self.t_high


@dataclass(frozen=True)
class StaticExport:
    """A concept cut into static embeddings, in denoising order (high t first).

    embeddings: trigger word -> (K, D) token vectors, one per identity segment.
    band: the generation band the segments cover; late_stage: as the concept's.
    """

    name: str
    super_category: str
    band: tuple[int, int]
    late_stage: str
    segments: tuple[Segment, ...]
    embeddings: dict[str, torch.Tensor] = field(repr=False)
    lost: tuple[str, ...] = ()

    def segment_at(self, t: float) -> int:
        """Index of the segment that covers timestep ``t``."""
        for index, segment in enumerate(self.segments):
            if segment.covers(t):
                return index
        raise ValueError(f"no segment covers t={t}")  # the segments tile [-0.5, 999.5]

    def text(self, index: int) -> str:
        """What stands for the person in segment ``index``: a trigger word or the super-category."""
        return self.segments[index].embedding or self.super_category

    def plan(self) -> dict[str, Any]:
        """The JSON-able description the bundle's script and README read."""
        return {
            "name": self.name,
            "super_category": self.super_category,
            "band": list(self.band),
            "late_stage": self.late_stage,
            "segments": [
                {"embedding": s.embedding, "t_low": s.t_low, "t_high": s.t_high, "mapper_timestep": s.mapper_timestep}
                for s in self.segments
            ],
        }


def check_name(name: str) -> str:
    """A trigger word every tool accepts: lower-case letters, digits, '-' and '_', at most 40."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExportError(
            f"The export name {name!r} cannot be a trigger word: use 1-40 lower-case letters, digits, '-' or '_', "
            f"starting with a letter or digit (e.g. 'alice')."
        )
    return name


def _segment_edges(band: tuple[int, int], count: int) -> list[float]:
    """count + 1 half-integer edges from band start - 0.5 to band end + 0.5, evenly spaced."""
    lo, hi = band
    inner = [math.floor(lo + (hi - lo) * j / count) + 0.5 for j in range(1, count)]
    edges = [lo - 0.5, *inner, min(hi, LAST_TIMESTEP) + 0.5]
    if len(set(edges)) != len(edges):
        raise ExportError(f"The band {list(band)} is too narrow for {count} segments; use fewer segments.")
    return edges


@torch.no_grad()
def static_export(concept: Concept, name: str, num_segments: int = 2, band: tuple[int, int] | None = None) -> StaticExport:
    """Cut ``concept`` into ``num_segments`` static embeddings over ``band`` (default: its training band).

    Segment j's embedding is mapper(t_j) at the middle t_j of its timestep interval (no image
    bypass). A concept without stage regulation (or a plain TI concept) spans all timesteps.
    """
    check_name(name)
    if not isinstance(num_segments, int) or not 1 <= num_segments <= MAX_SEGMENTS:
        raise ExportError(f"The number of segments must be a whole number from 1 to {MAX_SEGMENTS}, got {num_segments!r}.")
    if concept.method == "ti":
        num_segments = 1  # its vectors do not depend on t: one file says it all
    band = (0, NUM_TRAIN_TIMESTEPS) if not concept.stage_regulation else check_band(band or concept.train_band, "export band")
    edges = _segment_edges(band, num_segments)
    lo, hi = band
    segments: list[Segment] = []
    if hi < LAST_TIMESTEP:
        segments.append(Segment(None, hi + 0.5, LAST_TIMESTEP + 0.5))
    identity: list[Segment] = []
    for j in reversed(range(num_segments)):
        mid = int(round((edges[j] + edges[j + 1]) / 2))
        label = f"{name}-{num_segments - j}" if num_segments > 1 else name
        identity.append(Segment(label, edges[j], edges[j + 1], mid))
    # Late stage: the mapper at the band start, i.e. the lowest segment's embedding goes on to
    # the end; or the word again.
    if lo > 0 and concept.late_stage == "super_category":
        segments.extend(identity)
        segments.append(Segment(None, -0.5, lo - 0.5))
    else:
        identity[-1] = replace(identity[-1], t_low=-0.5)
        segments.extend(identity)
    mapper = concept.mapper
    times = torch.tensor([s.mapper_timestep for s in identity], device=mapper.class_embedding.device)
    vectors = mapper(times).float().cpu()  # (S, K, D)
    embeddings = {s.embedding: vectors[i].clone().contiguous() for i, s in enumerate(identity)}
    lost = ["the continuous time dependence (one embedding per segment)"] if concept.method != "ti" else []
    if concept.mapper.has_bypass and concept.image_embedding is not None:
        lost.append("the image bypass (the reference photo's push on the cross-attention values)")
    lost.append("the tandem balance (gamma): other tools weigh all tokens alike")
    return StaticExport(name, concept.super_category, band, concept.late_stage, tuple(segments), embeddings, tuple(lost))


# =========================================================================== the studio's view of it
class SegmentedStaticMapper(nn.Module):
    """The exported approximation as a mapper: t -> the static embedding of t's segment.

    Lets the studio's own sampler render exactly what the other tools get (no bypass).
    """

    method = "static-export"
    bypass = None
    image_embed_dim = None

    def __init__(self, export: StaticExport, class_embedding: torch.Tensor) -> None:
        super().__init__()
        identity = [i for i, s in enumerate(export.segments) if s.embedding is not None]
        table = torch.stack([export.embeddings[export.segments[i].embedding] for i in identity])
        self.register_buffer("class_embedding", class_embedding.detach().float().clone())
        self.register_buffer("table", table.float())  # (S, K, D)
        self.num_tokens, self.token_dim = table.shape[1], table.shape[2]
        self._export = export
        self._row = {segment: row for row, segment in enumerate(identity)}

    @property
    def has_bypass(self) -> bool:
        return False

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, K, D) the static vectors of each timestep's segment."""
        rows = []
        for t in timesteps.tolist():
            index = self._export.segment_at(t)
            if index not in self._row:
                raise ValueError(f"t={t} lies in a segment with the super-category word, not an embedding")
            rows.append(self._row[index])
        return self.table[torch.tensor(rows, device=self.table.device)]


def exported_concept(concept: Concept, export: StaticExport) -> Concept:
    """A concept that generates what the export generates elsewhere (render it with ``band=export.band``)."""
    mapper = SegmentedStaticMapper(export, concept.mapper.class_embedding).to(concept.mapper.class_embedding.device)
    return Concept(
        mapper=mapper.eval(), super_category=concept.super_category, train_band=export.band,
        late_stage=concept.late_stage, backbone=concept.backbone, image_embedding=None,
        steps_done=concept.steps_done, config=concept.config, stage_regulation=concept.stage_regulation,
    )


# =========================================================================== step tables
def step_segments(backbone: Backbone, export: StaticExport, scheduler: str, num_inference_steps: int) -> list[int]:
    """Segment index of every denoising step the studio's sampler takes with ``scheduler``."""
    from studio.sampler import stage_plan

    late_stage = export.late_stage
    plan = stage_plan(backbone, scheduler, num_inference_steps, export.band, late_stage)
    word_late = next((i for i, s in enumerate(export.segments) if s.embedding is None and s.t_high < export.band[0]), None)
    word_early = 0 if export.segments[0].embedding is None else None
    out = []
    for step in plan:
        if step.mapper_timestep is not None:
            out.append(export.segment_at(step.mapper_timestep))
        else:
            out.append(word_early if step.stage is Stage.EARLY else word_late)
    return out


def _runs(indices: list[int], export: StaticExport) -> list[tuple[str, int]]:
    """Consecutive steps with the same text -> [(text, step count), ...] in step order."""
    runs: list[tuple[str, int]] = []
    for index in indices:
        text = export.text(index)
        if runs and runs[-1][0] == text:
            runs[-1] = (text, runs[-1][1] + 1)
        else:
            runs.append((text, 1))
    return runs


@dataclass(frozen=True)
class A1111Prompt:
    """The prompt for A1111/Forge and how its steps split: runs = [(text, steps), ...]."""

    prompt: str
    negative_prompt: str
    steps: int
    runs: tuple[tuple[str, int], ...]
    note: str


def a1111_prompt(
    backbone: Backbone, export: StaticExport, prompt: str, scheduler: str = "dpmsolver++",
    num_inference_steps: int = 30, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
) -> A1111Prompt:
    """``prompt`` with ``{}`` replaced by nested ``[from:to:when]`` prompt editing.

    A1111 gives ``from`` to step indices 0..int(when * steps) and ``to`` after. A switch after
    c steps is written ``when = (c - 0.5) / steps``: half a step from both neighbours, so the
    rounding never moves it.
    """
    check_prompt(prompt, require_identity=True)
    runs = _runs(step_segments(backbone, export, scheduler, num_inference_steps), export)
    total = num_inference_steps
    ends = []
    done = 0
    for _, count in runs[:-1]:
        done += count
        ends.append(done)
    expression = runs[-1][0]
    for (text, _), end in zip(reversed(runs[:-1]), reversed(ends)):
        expression = f"[{text}:{expression}:{(end - 0.5) / total:.4f}]"
    note = (
        f"For {total} steps. A1111 switches on the step index, not on the timestep: these fractions reproduce "
        f"the studio's '{scheduler}' step table; other samplers place their steps a little differently."
    )
    if len(runs) > 1 and runs[0][1] == 1:
        note += " The first text gets one step only; A1111 1.6+ drops a switch at step 0, so it may not show."
    return A1111Prompt(prompt.replace(PLACEHOLDER, expression), negative_prompt, total, tuple(runs), note)


def comfyui_percent(t: float) -> float:
    """ComfyUI's sampling percent of timestep ``t`` (its percent_to_sigma maps p to the noise
    level of timestep (1 - p) * 999), clamped to [0, 1]."""
    return min(1.0, max(0.0, 1.0 - t / LAST_TIMESTEP))


def comfyui_ranges(export: StaticExport) -> list[tuple[float, float]]:
    """(start_percent, end_percent) of each segment, in denoising order (start < end)."""
    return [(comfyui_percent(s.t_high), comfyui_percent(s.t_low)) for s in export.segments]


def comfyui_workflow(
    export: StaticExport, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, *, seed: int = 0,
    steps: int = 30, cfg: float = 7.5, sampler_name: str = "dpmpp_2m", scheduler: str = "normal",
    width: int = 512, height: int = 512, checkpoint: str = "v1-5-pruned-emaonly.safetensors",
) -> dict[str, Any]:
    """ComfyUI API-format workflow: node id -> {"class_type", "inputs"}; a link is [node id, output]."""
    check_prompt(prompt, require_identity=True)
    nodes: dict[str, Any] = {}

    def add(class_type: str, **inputs: Any) -> str:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    loader = add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    combined = None
    for segment, (start, end) in zip(export.segments, comfyui_ranges(export)):
        word = f"embedding:{segment.embedding}" if segment.embedding else export.super_category
        encoded = add("CLIPTextEncode", text=prompt.replace(PLACEHOLDER, word), clip=[loader, 1])
        ranged = add("ConditioningSetTimestepRange", conditioning=[encoded, 0], start=round(start, 6), end=round(end, 6))
        combined = ranged if combined is None else add(
            "ConditioningCombine", conditioning_1=[combined, 0], conditioning_2=[ranged, 0]
        )
    negative = add("CLIPTextEncode", text=negative_prompt, clip=[loader, 1])
    latent = add("EmptyLatentImage", width=width, height=height, batch_size=1)
    sampled = add(
        "KSampler", model=[loader, 0], seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
        scheduler=scheduler, positive=[combined, 0], negative=[negative, 0], latent_image=[latent, 0], denoise=1.0,
    )
    decoded = add("VAEDecode", samples=[sampled, 0], vae=[loader, 2])
    add("SaveImage", images=[decoded, 0], filename_prefix=export.name)
    return nodes


# =========================================================================== files and bundle
def embedding_bytes(vectors: torch.Tensor, name: str) -> bytes:
    """A textual-inversion file every tool loads: exactly one tensor ``emb_params`` (K, D), fp32."""
    if vectors.ndim != 2:
        raise ValueError(f"expected (K, D) vectors, got shape {tuple(vectors.shape)}")
    return save_safetensors(
        {EMBEDDING_KEY: vectors.detach().float().cpu().contiguous()},
        metadata={"name": name, "format": "textual-inversion", "made_by": "PersonaMagic Studio"},
    )


@dataclass(frozen=True)
class ExportSettings:
    """What the bundle's prompts and workflow are written for."""

    prompt: str = "a photo of {}"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    scheduler: str = "dpmsolver++"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    size: int = 512


# The studio's schedulers and what the other tools call the nearest one.
_A1111_SAMPLERS = {
    "dpmsolver++": "DPM++ 2M", "dpmsolver++ karras": "DPM++ 2M Karras", "ddim": "DDIM", "euler": "Euler",
    "euler ancestral": "Euler a", "unipc": "UniPC", "pndm": "PLMS", "ddpm": "DDPM",
}
_COMFY_SAMPLERS = {
    "dpmsolver++": ("dpmpp_2m", "normal"), "dpmsolver++ karras": ("dpmpp_2m", "karras"), "ddim": ("ddim", "ddim_uniform"),
    "euler": ("euler", "normal"), "euler ancestral": ("euler_ancestral", "normal"), "unipc": ("uni_pc", "normal"),
    "pndm": ("euler", "normal"), "ddpm": ("ddpm", "normal"),
}


def bundle_files(
    backbone: Backbone, concept: Concept, export: StaticExport, settings: ExportSettings, formats: str = "all"
) -> dict[str, bytes]:
    """Relative path -> content of every file of the bundle for ``formats`` (a1111|comfyui|diffusers|all)."""
    if formats not in FORMATS:
        raise ExportError(f"Unknown export format {formats!r}; choose one of: {', '.join(FORMATS)}.")
    check_prompt(settings.prompt, require_identity=True)
    steps = settings.num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ExportError(f"The number of steps must be a whole number from 1 to 1000, got {steps!r}.")
    if not (isinstance(settings.size, int) and settings.size >= 64 and settings.size % 64 == 0):
        raise ExportError(f"The image size must be a multiple of 64 pixels, got {settings.size!r}.")
    wanted = {"a1111", "comfyui", "diffusers"} if formats == "all" else {formats}
    files: dict[str, bytes] = {}
    for name, vectors in export.embeddings.items():
        files[f"embeddings/{name}.safetensors"] = embedding_bytes(vectors, name)
    plan = {**export.plan(), "token_dim": int(next(iter(export.embeddings.values())).shape[-1]),
            "concept_uid": concept.uid, "lost": list(export.lost)}
    sections = []
    if "a1111" in wanted:
        a1111 = a1111_prompt(backbone, export, settings.prompt, settings.scheduler, settings.num_inference_steps,
                             settings.negative_prompt)
        plan["a1111"] = {"prompt": a1111.prompt, "negative_prompt": a1111.negative_prompt, "steps": a1111.steps,
                         "sampler": _A1111_SAMPLERS.get(settings.scheduler, settings.scheduler), "runs": a1111.runs}
        files["a1111/prompt.txt"] = f"{a1111.prompt}\n\nNegative prompt: {a1111.negative_prompt}\n\n{a1111.note}\n".encode()
        sections.append(_readme_a1111(export, a1111, settings))
    if "comfyui" in wanted:
        sampler_name, schedule = _COMFY_SAMPLERS.get(settings.scheduler, ("dpmpp_2m", "normal"))
        workflow = comfyui_workflow(
            export, settings.prompt, settings.negative_prompt, seed=settings.seed, steps=settings.num_inference_steps,
            cfg=settings.guidance_scale, sampler_name=sampler_name, scheduler=schedule,
            width=settings.size, height=settings.size,
        )
        files["comfyui/workflow_api.json"] = json.dumps(workflow, indent=2).encode()
        plan["comfyui"] = {"ranges": comfyui_ranges(export)}
        sections.append(_readme_comfyui(export))
    if "diffusers" in wanted:
        files["diffusers/generate.py"] = DIFFUSERS_SCRIPT.read_bytes()
        sections.append(_readme_diffusers(export, settings))
    files["export.json"] = json.dumps(plan, indent=2).encode()
    files["README.md"] = _readme(export, sections).encode()
    return files


def write_bundle(files: dict[str, bytes], path: str | Path) -> Path:
    """Write ``files`` into one zip at ``path`` (deflated) and return the path."""
    path = Path(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(files.items()):
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    return path


# =========================================================================== in the studio
def export_for_tools(
    engine: Any, folder: str | Path, name: str, num_segments: int, settings: ExportSettings,
    formats: str = "all", band: tuple[int, int] | None = None,
) -> tuple[Path, StaticExport, dict[str, bytes]]:
    """"Export for other tools": the session's newest concept as NAME-export.zip in ``folder``."""
    concept = engine.current_concept()
    if concept is None:
        raise ExportError("There is no concept to export yet: train one or import a concept file first.")
    export = static_export(concept, name, num_segments, band)
    files = bundle_files(engine.backbone(), concept, export, settings, formats)
    return write_bundle(files, Path(folder) / f"{export.name}-export.zip"), export, files


def compare_full_and_exported(engine: Any, export: StaticExport, prompt: str, seed: int, **settings: Any):
    """The full concept and its exported approximation on the same seed, both scored by the
    session's scorer. Returns two GenerationResults (full, exported); the exported one runs
    with the export's band and neutral balance, as other tools do."""
    concept = engine.current_concept()
    if concept is None:
        raise ExportError("There is no concept yet: train one or import a concept file first.")
    full = engine.generate(prompt, seeds=seed, **settings)
    approximate = {**settings, "band": export.band, "balance": 1.0}
    exported = engine.generate(prompt, concept=exported_concept(concept, export), seeds=seed, **approximate)
    return full, exported


def _segment_table(export: StaticExport) -> str:
    rows = ["| segment | text for the person | timesteps | ComfyUI start..end percent |", "|---|---|---|---|"]
    for index, (segment, (start, end)) in enumerate(zip(export.segments, comfyui_ranges(export))):
        text = segment.embedding or f"{export.super_category} (the word)"
        where = f"mapper({segment.mapper_timestep})" if segment.mapper_timestep is not None else "-"
        rows.append(f"| {index + 1} | {text} ({where}) | {max(segment.t_low, 0):g}..{min(segment.t_high, LAST_TIMESTEP):g} "
                    f"| {start:.4f}..{end:.4f} |")
    return "\n".join(rows)


def _readme(export: StaticExport, sections: list[str]) -> str:
    lost = "\n".join(f"- {item}" for item in export.lost)
    return f"""# {export.name}: a PersonaMagic Studio concept for other tools

The studio's concept is a function of the denoising timestep. Other tools load fixed textual-inversion
embeddings, so this bundle holds one embedding per segment of the band {list(export.band)} (files in
`embeddings/`, each one tensor `emb_params` of shape [tokens, width]) and tells each tool when to switch:

{_segment_table(export)}

## What is lost
{lost}

The studio can show this approximation beside the full concept on the same seed ("Export for other tools").

{chr(10).join(sections)}
"""


def _readme_a1111(export: StaticExport, a1111: A1111Prompt, settings: ExportSettings) -> str:
    runs = ", ".join(f"{text} for {count}" for text, count in a1111.runs)
    return f"""## AUTOMATIC1111 / Forge
1. Copy the files of `embeddings/` into the `embeddings/` folder of the web UI (the file name is the trigger word).
2. Use the prompt of `a1111/prompt.txt` with sampler {_A1111_SAMPLERS.get(settings.scheduler, settings.scheduler)}
   and **{a1111.steps} steps** (steps: {runs}):

       {a1111.prompt}

{a1111.note} For another step count, export again with that count.
"""


def _readme_comfyui(export: StaticExport) -> str:
    return """## ComfyUI
1. Copy the files of `embeddings/` into `ComfyUI/models/embeddings/`.
2. Load `comfyui/workflow_api.json` (API format: drag it onto the canvas, or POST it to `/prompt`) and pick
   your SD 1.5 checkpoint in the loader node.
Each segment is its own `CLIPTextEncode` limited by `ConditioningSetTimestepRange` (the percents above);
ComfyUI maps a percent p to the noise level of timestep (1 - p) x 999, so the switches happen at the same
timesteps as in the studio whatever sampler and step count you choose.
"""


def _readme_diffusers(export: StaticExport, settings: ExportSettings) -> str:
    return f"""## diffusers
    pip install diffusers transformers safetensors torch
    python diffusers/generate.py --model runwayml/stable-diffusion-v1-5 --prompt "{settings.prompt}" --steps {settings.num_inference_steps} --out out.png
The script loads each file with `load_textual_inversion` and, in `callback_on_step_end`, gives the next step
the prompt embeddings of its segment (by timestep, as the studio does).
"""


__all__ = [
    "A1111Prompt", "ExportError", "ExportSettings", "FORMATS", "Segment", "SegmentedStaticMapper", "StaticExport",
    "a1111_prompt", "bundle_files", "check_name", "comfyui_percent", "comfyui_ranges", "comfyui_workflow",
    "compare_full_and_exported", "embedding_bytes", "export_for_tools", "exported_concept", "static_export",
    "step_segments", "write_bundle",
]
