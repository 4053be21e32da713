"""The Compose tab without a browser: its texts, and that it builds inside a Blocks."""
from __future__ import annotations

import io

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.compose import REGION_COLOURS, ComposeInputError
from studio.sampler import GenerationInterrupted
from studio.ui.compose_tab import (
    LAYOUTS,
    SOURCES,
    ComposeHandlers,
    blank_canvas,
    build_compose_tab,
    canvas_size,
    chosen_boxes,
    guard_canvas,
    cost_text,
    run_cost_text,
    score_text,
)


def test_the_cost_counts_one_unet_pass_per_photo():
    assert cost_text(["This session's concept", "A concept file"], 1.0) == "Cost: 1 UNet pass per step."
    two_photos = cost_text(["This session's concept + its photo", "A photo"], 1.0)
    assert "3 UNet passes per step" in two_photos and "1 + 2 for the photos" in two_photos
    assert "1 UNet pass per step" in cost_text(["A photo", "A photo"], 0.0)  # RSA off: no reference pass
    assert cost_text(["A concept file", "A concept file"], 1.0, aspect=1.5) == (
        "Cost: 1 UNet pass per step, on a picture 1.5× as wide as a square one (room for two people side by side; "
        "the time grows with the pixels).")


def test_region_scores_are_a_table_with_a_dash_where_nothing_was_compared():
    text = score_text([[0.812, None], [0.5, 0.25]], 2)
    assert "| image | {0} | {1} |" in text
    assert "| 1 | 0.812 | – |" in text and "| 2 | 0.500 | 0.250 |" in text
    assert score_text((), 2) == "Region scores are off in this preset."


def test_the_tab_builds_with_every_source_offered(tiny_cfg):
    with gr.Blocks() as demo:
        build_compose_tab(lambda request: None, tiny_cfg)
    radios = [c for c in demo.blocks.values() if isinstance(c, gr.Radio) and c.elem_id and c.elem_id.startswith("compose-kind")]
    assert len(radios) == 2
    assert all([choice[0] for choice in r.choices] == list(SOURCES) for r in radios)


def test_the_cost_of_a_finished_run_replaces_the_estimate():
    assert run_cost_text(1, (768, 512)) == ("This run: 1 UNet pass per step at 768 × 512 (as in a plain generation of "
                                            "that size; finding the regions adds a little).")
    assert run_cost_text(3, (64, 64)) == "This run: 3 UNet passes per step at 64 × 64 (up to 3× a plain generation's time at that size)."


class _InterruptedEngine:
    """An engine whose composition is interrupted after 2 of 5 steps (what Engine.compose raises)."""

    def __init__(self) -> None:
        self.interrupts = 0

    def compose(self, *args, **kwargs):
        raise GenerationInterrupted(2, 5)

    instant_preview = compose

    def interrupt_composition(self) -> None:
        self.interrupts += 1


def test_an_interrupted_composition_is_a_message_and_keeps_the_last_images(monkeypatch):
    warned = []
    monkeypatch.setattr(gr, "Warning", warned.append)
    engine = _InterruptedEngine()
    on = ComposeHandlers(lambda request: engine)
    outputs = on.on_compose("This session's concept", None, "A concept file", None, "{0} and {1}", "Left / right",
                            0, 5, "regions", request=None, progress=lambda *a, **k: None)
    assert outputs[2] == "Interrupted after 2 of 5 steps: nothing new was made."
    assert [type(o) for o in (outputs[0], outputs[1], outputs[3])] == [type(gr.skip())] * 3
    assert warned == ["Interrupted: Generation stopped after 2 of 5 steps."]
    assert on.on_instant(0, 5, request=None, progress=lambda *a, **k: None)[2].startswith("Interrupted after")
    on.on_interrupt(None)
    assert engine.interrupts == 1


def test_the_regions_choice_gives_no_boxes_side_boxes_or_the_drawn_ones():
    assert chosen_boxes("Found from the picture's attention", None, 2) is None
    assert chosen_boxes("Left / right", None, 2) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    drawing = blank_canvas((256, 256))
    layer = np.zeros_like(drawing["background"])
    layer[0:128, 0:64] = (*REGION_COLOURS[1], 255)
    layer[128:256, 192:256] = (*REGION_COLOURS[2], 255)
    drawing["layers"] = [layer]
    assert chosen_boxes("Drawn by me", drawing, 2) == [(0.0, 0.0, 0.25, 0.5), (0.75, 0.5, 1.0, 1.0)]
    with pytest.raises(ComposeInputError, match="Nothing is drawn: paint where each of the 2 people goes"):
        chosen_boxes("Drawn by me", blank_canvas(canvas_size(1.5)), 2)  # the canvas as it starts


def test_the_drawing_canvas_shows_only_when_drawn_regions_are_chosen(tiny_cfg):
    with gr.Blocks() as demo:
        build_compose_tab(lambda request: None, tiny_cfg)
    drawing = next(c for c in demo.blocks.values() if c.elem_id == "compose-drawing")  # the canvas and its help
    layout = next(c for c in demo.blocks.values() if c.elem_id == "compose-layout")
    assert not drawing.visible
    mode = next(c for c in demo.blocks.values() if c.elem_id == "compose-mode")
    toggle = next(fn for fn in demo.fns.values() if fn.inputs == [layout, mode] and fn.outputs == [drawing]).fn
    assert toggle("Drawn by me", "regions")["visible"] is True
    assert all(toggle(label, "regions")["visible"] is False for label in LAYOUTS if label != "Drawn by me")
    assert toggle("Drawn by me", "naive")["visible"] is False, "naive composition has no regions to draw"


def test_naive_mode_greys_the_regions_out_and_keeps_the_choice(tiny_cfg):
    with gr.Blocks() as demo:
        build_compose_tab(lambda request: None, tiny_cfg)
    layout = next(c for c in demo.blocks.values() if c.elem_id == "compose-layout")
    mode = next(c for c in demo.blocks.values() if c.elem_id == "compose-mode")
    switch = next(fn for fn in demo.fns.values() if fn.inputs == [layout, mode] and len(fn.outputs) == 2).fn
    regions, drawing = switch("Drawn by me", "naive")
    assert regions["interactive"] is False and "value" not in regions and "no regions" in regions["info"]
    assert drawing["visible"] is False
    regions, drawing = switch("Drawn by me", "regions")
    assert regions["interactive"] is True and drawing["visible"] is True


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 0)).save(buffer, "PNG")  # compresses to a few kB at any size
    return buffer.getvalue()


def _blobs(kind: str, index, content: bytes, drawing: str = "d1"):
    from gradio.components.image_editor import AcceptBlobs

    return AcceptBlobs(data={"type": kind, "index": index, "id": drawing, "file": b""}, files=[("blob", content)])


def test_the_canvas_refuses_a_huge_or_foreign_drawing_by_its_header_before_decoding_it(monkeypatch, tmp_path):
    from gradio.data_classes import FileData

    with gr.Blocks():
        canvas = guard_canvas(gr.ImageEditor(type="numpy", image_mode="RGBA"))
    assert canvas.convert_and_format_image(_png(256)).shape == (256, 256, 4)  # what the page sends
    huge = _png(8000)
    assert len(huge) < 2_000_000  # small on the wire, 256 MB once decoded
    (tmp_path / "huge.png").write_bytes(huge)
    (tmp_path / "page.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    for sent in (huge, FileData(path=str(tmp_path / "huge.png"))):  # the page's blobs, and an API client's file
        with pytest.raises(gr.Error, match="8000 x 8000 pixels, larger than a canvas can be"):
            canvas.convert_and_format_image(sent)
    for foreign in (b"<script>", FileData(path=str(tmp_path / "page.eps"))):  # EPS would run Ghostscript on load
        with pytest.raises(gr.Error, match="not a PNG the studio can read"):
            canvas.convert_and_format_image(foreign)
    assert decoded == [], "nothing was decoded"


def test_the_canvas_bounds_what_clients_may_upload_and_keep_waiting(tmp_path):
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    with gr.Blocks():
        canvas = guard_canvas(gr.ImageEditor(type="numpy", image_mode="RGBA"))
    assert getattr(canvas.accept_blobs, "_is_server_fn", False)  # still the endpoint the page calls
    canvas.accept_blobs(_blobs("layer", "1", _png(256)))
    assert len(canvas.blob_storage["d1"].layers) == 2  # layers 0 and 1: what a drawing may have
    with pytest.raises(gr.Error, match="at most 2 layers"):
        canvas.accept_blobs(_blobs("layer", str(10**9), b"x"))  # would allocate a list of 10^9 entries
    with pytest.raises(gr.Error, match="at most 2 layers"):
        canvas.accept_blobs(_blobs("layer", "-1", b"x"))
    with pytest.raises(gr.Error, match="at most 2000 kB"):
        canvas.accept_blobs(_blobs("background", None, b"x" * 2_000_001))
    for n in range(40):  # drawings uploaded and never used
        canvas.accept_blobs(_blobs("composite", None, _png(16), drawing=f"w{n}"))
    assert len(canvas.blob_storage) == 32 and "w39" in canvas.blob_storage and "d1" not in canvas.blob_storage
    with pytest.raises(gr.Error, match="at most 2 layers"):
        (tmp_path / "layer.png").write_bytes(_png(16))
        canvas.preprocess(EditorData(layers=[FileData(path=str(tmp_path / "layer.png"))] * 3))


def test_a_refused_composition_gives_its_buttons_back_too(tiny_cfg):
    """The step that turns Compose / Instant preview back on runs after a handler that returned (.then)
    and after one that raised (.failure): Gradio 6's page skips a .then step after an error."""
    with gr.Blocks() as demo:
        build_compose_tab(lambda request: None, tiny_cfg)
    for api_name in ("compose", "instant_preview"):
        run = next(fn for fn in demo.fns.values() if fn.api_name == api_name)
        after = [fn for fn in demo.fns.values() if fn.trigger_after == run._id]
        assert sorted((fn.trigger_only_on_success, fn.trigger_only_on_failure) for fn in after) == [(False, False), (False, True)]
        buttons = [c.elem_id for c in after[0].outputs]
        assert buttons == ["compose", "instant-preview", "compose-interrupt"] and all(
            [c.elem_id for c in fn.outputs] == buttons and fn.fn() == after[0].fn() for fn in after)
