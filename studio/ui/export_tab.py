"""The "Export & LoRAs" panel: export the concept for other tools, compare it with the full
concept on one seed, and pick style LoRAs for this session (docs/EXPORT.md)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from studio.engine import Engine, NoConceptYet
from studio.errors import FormError
from studio.export import FORMATS, MAX_SEGMENTS, ExportSettings, compare_full_and_exported, export_for_tools, static_export
from studio.lora import MAX_LORAS, STRENGTH_RANGE, LoraUse, load_lora
from studio.sampler import SCHEDULERS
from studio.ui import views

EXPLAIN = (
    "Other tools cannot run the time-dependent mapper, so the band is cut into a few segments, each saved as a "
    "plain textual-inversion embedding, with the switching written the way each tool does it: prompt editing "
    "for A1111/Forge (computed for the sampler and step count below: A1111 switches on the step index, not on "
    "the timestep), timestep ranges for ComfyUI, a step callback for diffusers. The image bypass, the continuous "
    "time dependence and the tandem balance do not travel: *Compare* shows what that costs on one seed."
)
LORA_HELP = (
    "Style LoRAs for SD 1.x (`.safetensors`, kohya/A1111 or diffusers layout) act on this session's previews, "
    "generations and sweeps only; other sessions never see them."
)


def _export_layout(default_steps: int) -> SimpleNamespace:
    """Every component of the tab, by name."""
    tab = SimpleNamespace()
    gr.Markdown(EXPLAIN, elem_classes=["help"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=340):
            with gr.Row():
                tab.name = gr.Textbox("my-face", label="Trigger word", elem_id="export-name")
                tab.segments = gr.Slider(1, MAX_SEGMENTS, value=2, step=1, label="Segments", elem_id="export-segments")
                tab.formats = gr.Dropdown(list(FORMATS), value="all", label="For", elem_id="export-format")
            tab.prompt = gr.Textbox("a photo of {}", label="Prompt ({} = the person)", elem_id="export-prompt")
            with gr.Row():
                tab.scheduler = gr.Dropdown(list(SCHEDULERS), value="dpmsolver++", label="Sampler", elem_id="export-scheduler")
                tab.steps = gr.Slider(1, 100, value=default_steps, step=1, label="Steps", elem_id="export-steps")
                tab.seed = gr.Number(0, precision=0, label="Seed", elem_id="export-seed")
            with gr.Row():
                tab.export_btn = gr.Button("Export for other tools", variant="primary", elem_id="export-tools")
                tab.compare_btn = gr.Button("Compare full vs exported", elem_id="export-compare")
            tab.bundle = gr.File(label="Bundle (.zip)", interactive=False, elem_id="export-bundle", height=100)
            tab.a1111 = gr.Markdown(elem_id="export-a1111")
        with gr.Column(scale=3, min_width=420):
            tab.compared = gr.Gallery(label="Full concept | exported approximation (same seed)", columns=2, height="auto",
                                      elem_id="export-gallery", interactive=False, object_fit="contain")
            gr.Markdown("### Style LoRAs")
            gr.Markdown(LORA_HELP, elem_classes=["help"])
            tab.lora_files = gr.File(file_count="multiple", file_types=[".safetensors"],
                                     label=f"LoRA files (up to {MAX_LORAS})", elem_id="lora-files", height=100)
            tab.strengths = [gr.Slider(*STRENGTH_RANGE, value=1.0, step=0.05, label=f"Strength {i + 1}",
                                       elem_id=f"lora-strength-{i}", visible=False) for i in range(MAX_LORAS)]
            tab.lora_btn = gr.Button("Use these LoRAs", elem_id="lora-use")
            tab.lora_msg = gr.Markdown(elem_id="lora-msg")
    return tab


def strength_sliders(files: list[str] | None) -> list[Any]:
    """One strength slider shown per LoRA file, named after it; the rest hidden."""
    names = [Path(f).name for f in (files or [])]
    return [gr.update(visible=i < len(names), label=f"Strength · {names[i]}" if i < len(names) else f"Strength {i + 1}")
            for i in range(MAX_LORAS)]


def _whole(value: Any, what: str) -> int:
    return views.as_number(value, what, whole=True)


def _band(lo: Any, hi: Any) -> tuple[int, int]:
    return _whole(lo, "The interval start"), _whole(hi, "The interval end")


def _settings(text: str, sched: str, n_steps: Any, seed: Any) -> ExportSettings:
    return ExportSettings(prompt=text, scheduler=sched, num_inference_steps=_whole(n_steps, "The number of steps"),
                          seed=_whole(seed, "The seed"))


class ExportHandlers:
    """The tab's handlers: ``folder_for`` gives a request's session folder (deleted with the
    session), ``own_for(request, *paths)`` hands uploads to the session."""

    def __init__(self, engine_for: Callable[[gr.Request], Engine], folder_for: Callable[[gr.Request], Path],
                 own_for: Callable[..., None]) -> None:
        self.engine_for, self.folder_for, self.own_for = engine_for, folder_for, own_for

    def on_export(self, word, count, fmt, text, sched, n_steps, seed, lo, hi, request: gr.Request):
        """The bundle's path, and the A1111 prompt to paste."""
        engine = self.engine_for(request)
        folder = self.folder_for(request)  # deleted with the session
        try:
            path, _export, files = export_for_tools(engine, folder, word, _whole(count, "The number of segments"),
                                                    _settings(text, sched, n_steps, seed), fmt, _band(lo, hi))
        except (ValueError, OSError) as exc:
            raise views.user_error(exc) from None
        note = files.get("a1111/prompt.txt", b"").decode()
        return str(path), (f"**A1111/Forge prompt** ({n_steps} steps):\n\n```\n{note.strip()}\n```" if note else "✓ Exported.")

    def on_compare(self, word, count, text, sched, n_steps, seed, lo, hi, gamma, request: gr.Request):
        """The full concept and its export, one image each on the same seed."""
        engine = self.engine_for(request)
        try:
            concept = engine.current_concept()
            if concept is None:
                raise NoConceptYet("There is no concept yet: train one or import a concept file first.")
            band = _band(lo, hi)
            export = static_export(concept, word, _whole(count, "The number of segments"), band)
            full, exported = compare_full_and_exported(
                engine, export, text, _whole(seed, "The seed"), scheduler=sched, band=band,
                num_inference_steps=_whole(n_steps, "The number of steps"), balance=views.as_number(gamma, "The tandem balance"),
            )
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        return [(full.images[0], f"full · {full.captions[0]}"), (exported.images[0], f"exported · {exported.captions[0]}")]

    def on_loras(self, files, s1, s2, s3, s4, request: gr.Request):
        """Style LoRAs for this session, one strength slider per file, in order (MAX_LORAS = 4)."""
        strengths = (s1, s2, s3, s4)
        engine = self.engine_for(request)
        files = list(files or [])
        if len(files) > MAX_LORAS:
            raise views.user_error(FormError(f"Pick at most {MAX_LORAS} LoRA files, got {len(files)}."))
        self.own_for(request, *files)
        uses = []
        for path, strength in zip(files, strengths):
            try:
                uses.append(LoraUse(load_lora(path, engine.backbone()), views.as_number(strength, "A LoRA strength")))
            except ValueError as exc:
                raise views.user_error(exc) from None
        engine.loras = tuple(uses)
        if not uses:
            return "No style LoRA: images use the base model as it is."
        return "✓ " + ", ".join(f"`{u.weights.name}` × {u.strength:g}" for u in uses)


def build_export_tab(engine_for: Callable[[gr.Request], Engine], folder_for: Callable[[gr.Request], Path],
                     own_for: Callable[..., None], band_lo: gr.Slider, band_hi: gr.Slider, balance: gr.Slider, *,
                     default_steps: int = 30) -> None:
    """Call inside ``with gr.Tab(...)``; ``folder_for`` and ``own_for`` as for ExportHandlers."""
    tab = _export_layout(default_steps)
    on = ExportHandlers(engine_for, folder_for, own_for)
    tab.export_btn.click(on.on_export, [tab.name, tab.segments, tab.formats, tab.prompt, tab.scheduler, tab.steps, tab.seed,
                                        band_lo, band_hi], [tab.bundle, tab.a1111], api_name="export_tools",
                         concurrency_limit=None)
    tab.compare_btn.click(on.on_compare, [tab.name, tab.segments, tab.prompt, tab.scheduler, tab.steps, tab.seed,
                                          band_lo, band_hi, balance], [tab.compared], api_name="export_compare")
    tab.lora_files.change(strength_sliders, [tab.lora_files], tab.strengths, api_visibility="private", queue=False)
    tab.lora_btn.click(on.on_loras, [tab.lora_files, *tab.strengths], [tab.lora_msg], api_name="loras",
                       concurrency_limit=None)
