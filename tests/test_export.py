"""Exports for A1111/Forge, ComfyUI and diffusers: files the real loaders take, step tables that match the studio's."""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import re
import zipfile

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from studio.conditioning import StageSchedule
from studio.export import (
    ExportError,
    ExportSettings,
    a1111_prompt,
    bundle_files,
    comfyui_ranges,
    comfyui_workflow,
    exported_concept,
    static_export,
    step_segments,
    write_bundle,
)
from studio.sampler import SCHEDULERS, Sampler
from test_sampler import make_concept

# What each ComfyUI node class outputs (the ones the workflow uses).
COMFY_OUTPUTS = {
    "CheckpointLoaderSimple": 3, "CLIPTextEncode": 1, "ConditioningSetTimestepRange": 1, "ConditioningCombine": 1,
    "EmptyLatentImage": 1, "KSampler": 1, "VAEDecode": 1, "SaveImage": 0,
}


@pytest.fixture(scope="module")
def concept(backbone):
    return make_concept(backbone, seed=3)


def _bundle(tmp_path, backbone, concept, export, **settings):
    files = bundle_files(backbone, concept, export, ExportSettings(**settings))
    path = write_bundle(files, tmp_path / "bundle.zip")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "bundle")
    return tmp_path / "bundle"


def _tiny_pipeline(backbone, scheduler: str) -> StableDiffusionPipeline:
    """A diffusers pipeline on the tiny components; the text encoder and tokenizer are copies,
    because load_textual_inversion grows them (the shared backbone must stay as it is)."""
    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=copy.deepcopy(backbone.text_encoder), tokenizer=copy.deepcopy(backbone.tokenizer),
        unet=backbone.unet, scheduler=SCHEDULERS[scheduler](backbone.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- files
def test_each_embedding_file_holds_exactly_one_tensor_of_the_models_width(tmp_path, backbone, concept):
    export = static_export(concept, "alice", num_segments=3)
    folder = _bundle(tmp_path, backbone, concept, export)
    files = sorted((folder / "embeddings").glob("*.safetensors"))
    assert [f.stem for f in files] == ["alice-1", "alice-2", "alice-3"]
    for path in files:
        with safe_open(str(path), "pt") as handle:
            assert list(handle.keys()) == ["emb_params"]  # A1111: one tensor; kohya/ComfyUI: that name
            tensor = handle.get_tensor("emb_params")
        assert tensor.shape == (concept.num_tokens, backbone.token_dim) and tensor.dtype == torch.float32
    readme = (folder / "README.md").read_text()
    assert "What is lost" in readme and "balance" in readme


def test_segment_embeddings_are_the_mapper_at_the_segment_middles(backbone, concept):
    export = static_export(concept, "alice", num_segments=2, band=(200, 900))
    for segment in export.segments:
        if segment.embedding is None:
            continue
        assert segment.t_low < segment.mapper_timestep < segment.t_high
        expected = concept.mapper(torch.tensor([segment.mapper_timestep]))[0]
        torch.testing.assert_close(export.embeddings[segment.embedding], expected)


def test_bad_export_settings_are_refused_with_a_sentence(concept):
    with pytest.raises(ExportError, match="trigger word"):
        static_export(concept, "Alice Smith")
    with pytest.raises(ExportError, match="segments"):
        static_export(concept, "alice", num_segments=0)


# --------------------------------------------------------------------------- diffusers
def test_diffusers_script_with_load_textual_inversion_reproduces_the_studio_static_generation(tmp_path, backbone, concept):
    scheduler = "dpmsolver++"
    export = static_export(concept, "alice", num_segments=2, band=(200, 900))
    folder = _bundle(tmp_path, backbone, concept, export, scheduler=scheduler)
    spec = importlib.util.spec_from_file_location("bundle_generate", folder / "diffusers" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    steps, seed, prompt, negative = 6, 11, "a photo of {} as a chef", "blurry"
    pipe = _tiny_pipeline(backbone, scheduler)
    theirs = np.asarray(script.generate(
        pipe, prompt, bundle=folder, negative_prompt=negative, num_inference_steps=steps, guidance_scale=6.0, seed=seed,
    ), dtype=np.int16)
    ours = Sampler(backbone)(
        exported_concept(concept, export), prompt, band=export.band, seeds=seed, num_inference_steps=steps,
        guidance_scale=6.0, negative_prompt=negative, scheduler=scheduler,
    )
    mine = np.asarray(ours.images[0], dtype=np.int16)
    assert len(set(step_segments(backbone, export, scheduler, steps))) == 3  # word, segment 1, segment 2 all used
    assert np.abs(theirs - mine).max() <= 1  # within rounding of the 8-bit image
    # the switching matters: the same pipeline on one static segment gives another image
    single = static_export(concept, "solo", num_segments=1, band=(0, 1000))
    (tmp_path / "b").mkdir()
    other = np.asarray(script.generate(
        _tiny_pipeline(backbone, scheduler), prompt, plan=single.plan(), bundle=_bundle(tmp_path / "b", backbone, concept, single),
        negative_prompt=negative, num_inference_steps=steps, guidance_scale=6.0, seed=seed,
    ), dtype=np.int16)
    assert np.abs(other - mine).max() > 1


# --------------------------------------------------------------------------- step tables
def _studio_texts(backbone, export, scheduler: str, steps: int) -> list[str]:
    """What the studio's sampler puts at {} in each step, from its scheduler's timesteps directly."""
    noise_scheduler = SCHEDULERS[scheduler](backbone.noise_scheduler.config)
    noise_scheduler.set_timesteps(steps)
    schedule = StageSchedule(export.band, export.late_stage)
    texts = []
    for t in noise_scheduler.timesteps.tolist():
        mapper_t = schedule.mapper_timestep(int(t))
        if mapper_t is None:
            texts.append(export.super_category)
        else:
            texts.append(next(s.embedding for s in export.segments if s.embedding and s.t_low <= mapper_t <= s.t_high))
    return texts


def _a1111_text_at(expression: str, step: int, steps: int) -> str:
    """A1111's prompt editing, read from its documented rule: in [from:to:when] with when < 1,
    ``from`` holds for 0-based step indices up to int(when * steps), ``to`` after."""
    match = re.fullmatch(r"\[([^\[\]:]+):(.*):([0-9.]+)\]", expression)
    if match is None:
        return expression
    before, after, when = match.group(1), match.group(2), float(match.group(3))
    assert 0 < when < 1 and "." in match.group(3)
    return before if step <= int(when * steps) else _a1111_text_at(after, step, steps)


def _comfy_sigma_of_percent(backbone, percent: float) -> float:
    """ComfyUI's percent_to_sigma for discrete SD schedules (log-sigma interpolated at (1 - p) * 999)."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    log_sigmas = _log_sigmas(backbone)
    t = (1.0 - percent) * 999.0
    low, high, w = math.floor(t), math.ceil(t), t - math.floor(t)
    return math.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def _log_sigmas(backbone) -> list[float]:
    alphas = backbone.noise_scheduler.alphas_cumprod.double()
    return (((1 - alphas) / alphas) ** 0.5).log().tolist()


CASES = [("dpmsolver++", 30), ("euler", 20), ("ddim", 50)]
BANDS = [((400, 800), "band_edge", 2), ((200, 900), "super_category", 3), ((0, 1000), "band_edge", 2), ((250, 999), "band_edge", 3)]


@pytest.mark.parametrize("scheduler,steps", CASES)
@pytest.mark.parametrize("band,late_stage,segments", BANDS)
def test_a1111_when_fractions_and_comfyui_percents_match_the_studio_step_table(
    backbone, scheduler, steps, band, late_stage, segments
):
    concept = make_concept(backbone, seed=1, late_stage=late_stage)
    export = static_export(concept, "alice", num_segments=segments, band=band)
    expected = _studio_texts(backbone, export, scheduler, steps)
    assert any(text.startswith("alice") for text in expected)

    # A1111: the nested prompt editing gives each step index the studio's text.
    prompt = a1111_prompt(backbone, export, "a photo of {}", scheduler, steps).prompt
    expression = prompt.removeprefix("a photo of ")
    assert [_a1111_text_at(expression, i, steps) for i in range(steps)] == expected

    # ComfyUI: at each step's noise level exactly one range is active, the studio's segment.
    log_sigmas = _log_sigmas(backbone)
    noise_scheduler = SCHEDULERS[scheduler](backbone.noise_scheduler.config)
    noise_scheduler.set_timesteps(steps)
    ranges = comfyui_ranges(export)
    for t, text in zip(noise_scheduler.timesteps.tolist(), expected):
        sigma = math.exp(log_sigmas[int(t)])
        active = [
            export.text(i) for i, (start, end) in enumerate(ranges)
            if _comfy_sigma_of_percent(backbone, end) <= sigma <= _comfy_sigma_of_percent(backbone, start)
        ]
        assert active == [text], (t, active, text)


# --------------------------------------------------------------------------- ComfyUI graph
def test_comfyui_workflow_is_a_valid_graph_with_ordered_percents_matching_the_band(concept):
    export = static_export(concept, "alice", num_segments=3, band=(300, 850))
    workflow = comfyui_workflow(export, "a photo of {} on a beach", "ugly", seed=5, steps=25)
    json.loads(json.dumps(workflow))  # plain JSON
    for node_id, node in workflow.items():
        assert node["class_type"] in COMFY_OUTPUTS
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link [node id, output index]
                source, output = value
                assert source in workflow and source != node_id
                assert 0 <= output < COMFY_OUTPUTS[workflow[source]["class_type"]]
    ranges = [(n["inputs"]["start"], n["inputs"]["end"]) for n in workflow.values()
              if n["class_type"] == "ConditioningSetTimestepRange"]
    assert ranges[0][0] == 0.0 and ranges[-1][1] == 1.0
    assert all(start < end for start, end in ranges)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in denoising order
    assert ranges[0][1] == pytest.approx(1 - 850.5 / 999, abs=1e-6)  # the band's top: the word before it
    assert ranges[-1][0] == pytest.approx(1 - (300 + (850 - 300) // 3) / 999 - 0.5 / 999, abs=1e-6)
    texts = [n["inputs"]["text"] for n in workflow.values() if n["class_type"] == "CLIPTextEncode"]
    assert texts == ["a photo of face on a beach", *[f"a photo of embedding:alice-{i} on a beach" for i in (1, 2, 3)], "ugly"]

    # the sampler's positive input reaches every range through the combines
    sampler = next(n for n in workflow.values() if n["class_type"] == "KSampler")
    reached, frontier = set(), [sampler["inputs"]["positive"][0]]
    while frontier:
        node_id = frontier.pop()
        reached.add(node_id)
        frontier += [v[0] for v in workflow[node_id]["inputs"].values() if isinstance(v, list)]
    ranged = {i for i, n in workflow.items() if n["class_type"] == "ConditioningSetTimestepRange"}
    assert ranged <= reached
    assert workflow[sampler["inputs"]["negative"][0]]["inputs"]["text"] == "ugly"


def test_the_bundle_zip_holds_what_each_format_needs(tmp_path, backbone, concept):
    export = static_export(concept, "alice", num_segments=2)
    only = bundle_files(backbone, concept, export, ExportSettings(), "a1111")
    assert "a1111/prompt.txt" in only and "comfyui/workflow_api.json" not in only
    path = write_bundle(bundle_files(backbone, concept, export, ExportSettings()), tmp_path / "all.zip")
    names = set(zipfile.ZipFile(io.BytesIO(path.read_bytes())).namelist())
    assert {"README.md", "export.json", "a1111/prompt.txt", "comfyui/workflow_api.json", "diffusers/generate.py",
            "embeddings/alice-1.safetensors", "embeddings/alice-2.safetensors"} <= names
    with pytest.raises(ExportError, match="format"):
        bundle_files(backbone, concept, export, ExportSettings(), "invokeai")


def test_the_export_command_writes_the_bundle_and_refuses_bad_names(tmp_path, backbone, concept, capsys):
    from studio.cli import main
    from studio.concept_file import save_concept

    path = save_concept(concept, tmp_path / "Alice Smith.safetensors")
    code = main(["export", "--preset", "tiny", "--concept", str(path), "--out", str(tmp_path / "out"),
                 "--prompt", "a photo of {} as a chef", "--scheduler", "ddim", "--steps", "50", "--segments", "3"])
    assert code == 0
    bundle = zipfile.ZipFile(tmp_path / "out" / "alice-smith-export.zip")
    plan = json.loads(bundle.read("export.json"))
    assert [s["embedding"] for s in plan["segments"] if s["embedding"]] == ["alice-smith-1", "alice-smith-2", "alice-smith-3"]
    assert plan["a1111"]["steps"] == 50 and "[face:[alice-smith-1:" in plan["a1111"]["prompt"]
    assert "alice-smith-export.zip" in capsys.readouterr().out
    code = main(["export", "--preset", "tiny", "--concept", str(path), "--out", str(tmp_path / "out"), "--name", "Bad Name"])
    assert code == 2 and "cannot be a trigger word" in capsys.readouterr().err


def test_the_studio_exports_the_session_concept_and_renders_full_and_exported_on_one_seed(tmp_path, tiny_cfg, concept):
    from studio.concept_file import concept_to_bytes
    from studio.engine import Engine

    engine = Engine(tiny_cfg, session_id="export-test")
    try:
        with pytest.raises(ExportError, match="no concept"):
            from studio.export import export_for_tools

            export_for_tools(engine, tmp_path, "alice", 2, ExportSettings())
        engine.import_concept(concept_to_bytes(concept))
        path, export, files = export_for_tools(engine, tmp_path, "alice", 2, ExportSettings(num_inference_steps=4))
        assert path == tmp_path / "alice-export.zip" and path.is_file() and "comfyui/workflow_api.json" in files
        from studio.export import compare_full_and_exported

        full, exported = compare_full_and_exported(
            engine, export, "a photo of {}", 3, num_inference_steps=4, band=(200, 900), balance=1.5,
        )
        assert full.settings[0]["seed"] == exported.settings[0]["seed"] == 3
        assert exported.settings[0]["balance"] == 1.0 and exported.settings[0]["concept_uid"] != concept.uid
        assert not np.array_equal(np.asarray(full.images[0]), np.asarray(exported.images[0]))
    finally:
        engine.close()
