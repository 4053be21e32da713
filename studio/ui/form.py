"""The training form: one spec per control, mapping it to its config key.

The spec is the single list the page builds its training inputs from, reads overrides with
and fills from a preset, so the three can never fall out of step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.config import StudioConfig, check_band
from studio.errors import FormError
from studio.ui import views


@dataclass(frozen=True)
class Field:
    """One training control. ``key`` is the dotted config key; ``index`` picks one end of a
    two-value setting (the band); ``what`` names the value in error messages."""

    key: str
    label: str
    what: str
    kind: str = "number"  # "number" or "slider"
    whole: bool = False
    index: int | None = None
    limits: tuple[float, float, float] | None = None  # slider (minimum, maximum, step)
    elem_id: str | None = None
    row: str = ""  # fields with the same row name sit side by side

    def value_in(self, cfg: StudioConfig) -> Any:
        section, name = self.key.split(".")
        value = getattr(getattr(cfg, section), name)
        return value if self.index is None else value[self.index]

    def component(self, cfg: StudioConfig) -> gr.components.Component:
        if self.kind == "slider":
            lo, hi, step = self.limits
            return gr.Slider(lo, hi, value=self.value_in(cfg), step=step, label=self.label, elem_id=self.elem_id)
        return gr.Number(self.value_in(cfg), precision=0 if self.whole else None, label=self.label, elem_id=self.elem_id)


STEPS = Field("train.steps", "Training steps", "The number of training steps", "slider", True,
              limits=(1, 3000, 1), elem_id="steps")
ADVANCED = (
    Field("train.lr", "Learning rate", "The learning rate", elem_id="lr", row="optimiser"),
    Field("train.batch_size", "Batch size", "The batch size", "slider", True, limits=(1, 8, 1), row="optimiser"),
    Field("train.seed", "Seed", "The training seed", whole=True, elem_id="seed", row="optimiser"),
    Field("train.band", "Training band start t", "The training band start", whole=True, index=0, row="band"),
    Field("train.band", "Training band end t", "The training band end", whole=True, index=1, row="band"),
    Field("train.te_weight", "Tandem weight λ", "The TE weight", row="tandem"),
    Field("train.te_balance", "Tandem target β", "The TE balance", "slider", limits=(0.0, 1.0, 0.05), row="tandem"),
    Field("train.preview_every", "Preview every N steps", "Preview every", whole=True, row="tandem"),
    Field("train.cgdr_weight", "Class-guided regularization weight (0 = off; outside the face, match the class prompt)",
          "The class-guided regularization weight", "slider", limits=(0.0, 2.0, 0.05), elem_id="cgdr-weight"),
)
# The order of the /train API's first arguments.
TRAINING_FORM: tuple[Field, ...] = (STEPS, *ADVANCED)


def overrides(fields: Sequence[Field], values: Sequence[Any]) -> dict[str, Any]:
    """Dotted config overrides from the form's values; an emptied field is named, not a crash."""
    missing = [field.label for field, value in zip(fields, values) if value is None]
    if missing:
        raise views.user_error(FormError(f"Fill in {', '.join(missing)} (a number) before training."))
    result: dict[str, Any] = {}
    for field, value in zip(fields, values):
        number = views.as_number(value, field.what, whole=field.whole)
        if field.index is None:
            result[field.key] = number
        else:
            result.setdefault(field.key, [None, None])[field.index] = number
    for key, value in result.items():
        if isinstance(value, list):
            try:
                result[key] = list(check_band(value, "training band"))
            except ValueError as exc:
                raise views.user_error(exc) from None
    return result


def values_from(fields: Sequence[Field], cfg: StudioConfig) -> list[Any]:
    """Each field's value in ``cfg`` (a preset fills the form with these)."""
    return [field.value_in(cfg) for field in fields]


def build(fields: Sequence[Field], cfg: StudioConfig) -> list[gr.components.Component]:
    """The fields' components in order; fields sharing a ``row`` sit in one gr.Row."""
    components, index = [], 0
    while index < len(fields):
        row = fields[index].row
        group = [fields[index]]
        while row and index + len(group) < len(fields) and fields[index + len(group)].row == row:
            group.append(fields[index + len(group)])
        if len(group) > 1:
            with gr.Row():
                components += [field.component(cfg) for field in group]
        else:
            components.append(group[0].component(cfg))
        index += len(group)
    return components
