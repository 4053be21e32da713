"""The Compose tab without a browser: its texts, and that it builds inside a Blocks."""
from __future__ import annotations

import gradio as gr

from studio.ui.compose_tab import SOURCES, build_compose_tab, cost_text, score_text


def test_the_cost_counts_one_unet_pass_per_photo():
    assert cost_text(["This session's concept", "A concept file"], 1.0) == "Cost: 1 UNet pass per step."
    two_photos = cost_text(["This session's concept + its photo", "A photo"], 1.0)
    assert "3 UNet passes per step" in two_photos and "1 + 2 for the photos" in two_photos
    assert "1 UNet pass per step" in cost_text(["A photo", "A photo"], 0.0)  # RSA off: no reference pass


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
