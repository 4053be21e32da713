"""The toy world: seeded procedural portraits of identities in scenes (docs/TOY.md).

An *identity* (an integer) fixes a face: shape and proportions, skin tone, eye spacing, size
and colour, brows, nose, mouth, hair colour and style, and a mark (mole or freckles). A
*scene* is what prompts control, in plain English words the CLIP tokenizer knows: setting,
headwear, eyewear, expression and style, plus a jitter of position, scale and rotation.
``render(identity, scene)`` draws the portrait deterministically; ``caption`` writes a
training sentence for it; ``parse_prompt`` reads a prompt back into the scene attributes it
asks for (unknown words are a :class:`ToyPromptError`).

Identities 0..99 999 are the pretraining range; identities from 100 000 up are never seen in
pretraining and are the ones every one-shot measurement uses.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from studio.errors import StudioError

PRETRAIN_IDENTITIES = range(0, 100_000)
FIRST_UNSEEN_IDENTITY = 100_000
# pixels of the world's native portraits (the toy model's resolution)
NATIVE_SIZE = 64
# internal supersampling: draw at this many times the output side, then downsample
_SUPERSAMPLE = 4

# --------------------------------------------------------------------------- scene vocabulary
# attribute -> value -> the phrases that ask for it (first phrase is used in captions).
SETTINGS: dict[str, tuple[str, ...]] = {
    "beach": ("on a beach", "on the beach", "at the beach", "beach"),
    "forest": ("in a forest", "in the forest", "forest"),
    "snowy mountain": ("on a snowy mountain", "in the snowy mountains", "snowy mountain", "snowy mountains", "in the snow"),
    "city at night": ("in a city at night", "on a city street at night", "city at night", "in the city at night"),
    "red wall": ("in front of a red wall", "against a red wall", "red wall"),
    "blue studio": ("in a blue studio", "blue studio", "against a blue background", "blue background"),
}
HEADWEAR: dict[str, tuple[str, ...]] = {
    "none": (),
    "red hat": ("wearing a red hat", "with a red hat", "in a red hat", "red hat"),
    "crown": ("wearing a crown", "with a crown", "crown"),
    "beanie": ("wearing a beanie", "with a beanie", "in a beanie", "beanie"),
}
EYEWEAR: dict[str, tuple[str, ...]] = {
    "none": (),
    "glasses": ("wearing glasses", "with glasses", "glasses"),
    "sunglasses": ("wearing sunglasses", "with sunglasses", "in sunglasses", "sunglasses"),
}
EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "with a neutral expression"),
    "smiling": ("smiling", "who is smiling", "is smiling", "with a smile"),
    "surprised": ("surprised", "who is surprised", "is surprised", "looking surprised"),
}
STYLES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "photo", "photograph"),
    "oil painting": ("an oil painting of", "oil painting"),
    "pencil sketch": ("a pencil sketch of", "pencil sketch"),
    "pixel art": ("pixel art of", "pixel art"),
    "watercolor": ("a watercolor of", "a watercolor painting of", "watercolor painting", "watercolor"),
}
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "setting": SETTINGS,
    "headwear": HEADWEAR,
    "eyewear": EYEWEAR,
    "expression": EXPRESSIONS,
    "style": STYLES,
}
# what an attribute is when the prompt does not ask for it (ground-truth renders)
DEFAULT_SCENE_VALUES = {"setting": "blue studio", "headwear": "none", "eyewear": "none",
                        "expression": "neutral", "style": "photo"}

# Identity traits: captions sometimes name a coarse trait (as real captions say "a blonde
# woman"), so that text can steer faces at all; the exact values are never named.
HAIR_COLOURS = {  # name -> RGB
    "black": (28, 24, 22), "brown": (96, 60, 34), "blond": (222, 186, 104), "red": (170, 62, 28),
    "grey": (150, 150, 154), "white": (236, 234, 226),
}
HAIR_STYLES = ("short", "long", "bald", "curly", "bob")
EYE_COLOURS = {"blue": (56, 108, 196), "green": (62, 138, 74), "brown": (92, 56, 28), "grey": (120, 128, 136)}
SKIN_TONES = {  # name -> (light end, dark end) of a continuous range
    "pale": ((250, 224, 206), (236, 200, 176)),
    "tan": ((214, 166, 122), (190, 140, 98)),
    "dark": ((140, 96, 66), (96, 62, 42)),
}
MARKS = ("none", "mole", "freckles")
TRAIT_PHRASES: dict[str, tuple[str, ...]] = {
    **{f"hair:{c}": (f"{c} hair",) for c in HAIR_COLOURS},
    "style:short": ("short hair",), "style:long": ("long hair",), "style:bald": ("bald",),
    "style:curly": ("curly hair",), "style:bob": ("a bob haircut",),
    **{f"eyes:{c}": (f"{c} eyes",) for c in EYE_COLOURS},
    **{f"skin:{s}": (f"{s} skin",) for s in SKIN_TONES},
    "mark:mole": ("a mole",), "mark:freckles": ("freckles",),
    "shape:round": ("a round face",), "shape:long": ("a long face",),
}
CLASS_WORDS = ("person", "face", "man", "woman")
# words a prompt may use besides the phrases above
FILLER_WORDS = frozenset(
    "a an the of with and who is in on at wearing person face portrait picture image close up closeup "
    "cropped headshot man woman this that one someone his her their".split()
)


PLACEHOLDER_HINT = "The prompt must contain {} where the person goes, e.g. \"a photo of {} wearing sunglasses in a forest\"."


class ToyPromptError(StudioError, ValueError):
    """A prompt the toy world cannot read; the message names the words it does not know."""


@dataclass(frozen=True)
class Scene:
    """What a prompt controls, plus the framing jitter (dx, dy as fractions of the side)."""

    setting: str = "blue studio"
    headwear: str = "none"
    eyewear: str = "none"
    expression: str = "neutral"
    style: str = "photo"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0  # degrees, counter-clockwise

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclass(frozen=True)
class Identity:
    """The features of one toy person (all drawn from ``np.random.default_rng(number)``)."""

    number: int
    face_width: float  # fraction of the portrait side
    face_aspect: float  # height / width
    chin: float  # 0 = round jaw, 1 = pointed
    skin: tuple[int, int, int]
    skin_name: str
    eye_spacing: float  # fraction of the face width
    eye_size: float  # fraction of the face width
    eye_height: float  # fraction of the face height above the centre
    eye_colour: tuple[int, int, int]
    eye_name: str
    brow_thickness: float
    brow_tilt: float  # degrees
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_colour: tuple[int, int, int]
    hair_colour: tuple[int, int, int]
    hair_name: str
    hair_style: str
    mark: str
    mark_position: tuple[float, float]  # on the face, in face-width units from the centre
    freckle_seed: int
    shape_name: str  # "round", "long" or "" (neither)
    traits: tuple[str, ...] = field(default=())

    @classmethod
    def from_number(cls, number: int) -> Identity:
        """The identity ``number`` (any int >= 0), the same on every machine."""
        if number < 0:
            raise ValueError(f"identity must be >= 0, got {number}")
        rng = np.random.default_rng([number, 7919])
        hair_name = str(rng.choice(list(HAIR_COLOURS)))
        eye_name = str(rng.choice(list(EYE_COLOURS)))
        skin_name = str(rng.choice(list(SKIN_TONES), p=[0.4, 0.35, 0.25]))
        light, dark = SKIN_TONES[skin_name]
        mix = rng.uniform()
        skin = tuple(int(round(a + (b - a) * mix + rng.normal(0, 4))) for a, b in zip(light, dark))
        face_aspect = float(rng.uniform(1.05, 1.5))
        shape_name = "round" if face_aspect < 1.17 else "long" if face_aspect > 1.38 else ""
        hair_style = str(rng.choice(HAIR_STYLES, p=[0.28, 0.24, 0.1, 0.19, 0.19]))
        mark = str(rng.choice(MARKS, p=[0.4, 0.3, 0.3]))
        base = lambda c, s: tuple(int(np.clip(v + rng.normal(0, s), 0, 255)) for v in c)  # noqa: E731
        ident = cls(
            number=number,
            face_width=float(rng.uniform(0.30, 0.40)),
            face_aspect=face_aspect,
            chin=float(rng.uniform(0.0, 1.0)),
            skin=tuple(int(np.clip(v, 0, 255)) for v in skin),  # type: ignore[arg-type]
            skin_name=skin_name,
            eye_spacing=float(rng.uniform(0.34, 0.52)),
            eye_size=float(rng.uniform(0.10, 0.17)),
            eye_height=float(rng.uniform(0.05, 0.2)),
            eye_colour=base(EYE_COLOURS[eye_name], 10),  # type: ignore[arg-type]
            eye_name=eye_name,
            brow_thickness=float(rng.uniform(0.02, 0.07)),
            brow_tilt=float(rng.uniform(-14, 14)),
            nose_length=float(rng.uniform(0.12, 0.26)),
            nose_width=float(rng.uniform(0.08, 0.2)),
            mouth_width=float(rng.uniform(0.25, 0.5)),
            lip_colour=base((176, 84, 84), 18),  # type: ignore[arg-type]
            hair_colour=base(HAIR_COLOURS[hair_name], 10),  # type: ignore[arg-type]
            hair_name=hair_name,
            hair_style=hair_style,
            mark=mark,
            mark_position=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.1, 0.3))),
            freckle_seed=int(rng.integers(0, 2**31)),
            shape_name=shape_name,
        )
        traits = [f"hair:{hair_name}", f"eyes:{eye_name}", f"skin:{skin_name}"]
        traits.append(f"style:{hair_style}")
        if mark != "none":
            traits.append(f"mark:{mark}")
        if shape_name:
            traits.append(f"shape:{shape_name}")
        return replace(ident, traits=tuple(traits))


# --------------------------------------------------------------------------- random scenes
def random_scene(rng: np.random.Generator, jitter: bool = True) -> Scene:
    """A scene with every attribute drawn uniformly, plus framing jitter."""
    values = {name: str(rng.choice(list(options))) for name, options in ATTRIBUTES.items()}
    if not jitter:
        return Scene(**values)
    return Scene(
        **values,
        dx=float(rng.uniform(-0.08, 0.08)),
        dy=float(rng.uniform(-0.06, 0.06)),
        scale=float(rng.uniform(0.88, 1.12)),
        rotation=float(rng.uniform(-12, 12)),
    )


def jittered(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with fresh framing jitter."""
    return replace(scene, dx=float(rng.uniform(-0.08, 0.08)), dy=float(rng.uniform(-0.06, 0.06)),
                   scale=float(rng.uniform(0.88, 1.12)), rotation=float(rng.uniform(-12, 12)))


def caption(identity: Identity, scene: Scene, rng: np.random.Generator) -> str:
    """A training sentence for a render, e.g. "an oil painting of a person with a red hat on a beach".

    Each non-default attribute is named with probability 0.85, a default one with 0.35; a
    coarse identity trait is named with probability 0.3 (one or two of them).
    """
    def named(attribute: str) -> str | None:
        value = getattr(scene, attribute)
        chance = 0.35 if value == DEFAULT_SCENE_VALUES[attribute] or value == "none" else 0.85
        phrases = ATTRIBUTES[attribute][value]
        if not phrases or rng.uniform() > chance:
            return None
        return str(rng.choice(phrases[: max(1, len(phrases) - 1)])) if attribute != "style" else phrases[0]

    style = named("style")
    klass = str(rng.choice(["a person", "a face", "a person", "a man", "a woman"]))
    # "a photo of" names the photo style, so an unnamed style gets a neutral opening
    words = [style if style else str(rng.choice(["a picture of", "a portrait of", ""]))]
    words.append(klass)
    extras = []
    if rng.uniform() < 0.3:
        picks = rng.choice(len(identity.traits), size=int(rng.integers(1, 3)), replace=False)
        extras.append("with " + " and ".join(TRAIT_PHRASES[identity.traits[i]][0] for i in sorted(picks)))
    for attribute in ("headwear", "eyewear", "expression", "setting"):
        phrase = named(attribute)
        if phrase:
            extras.append(phrase)
    order = rng.permutation(len(extras))
    words += [extras[i] for i in order]
    return " ".join(w for w in words if w)


# --------------------------------------------------------------------------- prompt parsing
def _phrase_table() -> list[tuple[str, str, str]]:
    """(phrase, attribute, value) for every scene phrase and ("trait", key) phrases, longest first."""
    table = [(p, a, v) for a, values in ATTRIBUTES.items() for v, phrases in values.items() for p in phrases]
    table += [(p, "trait", key) for key, phrases in TRAIT_PHRASES.items() for p in phrases]
    return sorted(table, key=lambda row: -len(row[0]))


_PHRASES = _phrase_table()


def parse_prompt(prompt: str, allow_traits: bool = False, allow_unknown: bool = False) -> dict[str, str]:
    """The scene attributes a prompt asks for, e.g. ``{"eyewear": "sunglasses", "setting": "forest"}``.

    ``{}`` and the class words stand for the person. A prompt naming two values of one
    attribute, or words the toy world does not know, raises :class:`ToyPromptError`.
    Identity traits ("red hair") are refused unless ``allow_traits`` (the identity decides them);
    unknown words unless ``allow_unknown`` (scoring: they ask for nothing the world can show).
    """
    found, traits, unknown = _read_prompt(prompt)
    if traits and not allow_traits:
        raise ToyPromptError(
            f"{', '.join(repr(t) for t in traits)} describes the person's own features, which the identity decides; "
            "leave it out of the prompt."
        )
    if unknown and not allow_unknown:
        known = "; ".join(f"{a}: {', '.join(v for v in values if v != 'none')}" for a, values in ATTRIBUTES.items())
        raise ToyPromptError(f"The toy world does not know {', '.join(repr(w) for w in unknown)}. It knows {known}.")
    return found


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` the toy world does not know, once each (its prompt score leaves them out)."""
    return _read_prompt(prompt)[2]


def _read_prompt(prompt: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(attribute -> value asked for, identity traits named, unknown words) of a prompt."""
    text = " " + re.sub(r"[^a-z{} ]+", " ", prompt.lower().replace(",", " ")) + " "
    text = re.sub(r"\s+", " ", text)
    found: dict[str, str] = {}
    traits: list[str] = []
    for phrase, attribute, value in _PHRASES:
        pattern = f" {phrase} "
        while pattern in text:
            text = text.replace(pattern, " | ", 1)
            if attribute == "trait":
                traits.append(phrase)
                continue
            if attribute in found and found[attribute] != value:
                raise ToyPromptError(
                    f"The prompt asks for two {attribute}s ({found[attribute]!r} and {value!r}); the toy world shows one."
                )
            found[attribute] = value
    unknown = [w for w in text.replace("{}", " ").split() if w != "|" and w not in FILLER_WORDS]
    return found, traits, list(dict.fromkeys(unknown))


def scene_for_prompt(prompt: str, rng: np.random.Generator | None = None) -> Scene:
    """The ground-truth scene of a prompt: asked-for attributes, defaults for the rest, and
    framing jitter drawn from ``rng`` (none without one)."""
    values = {**DEFAULT_SCENE_VALUES, **parse_prompt(prompt)}
    scene = Scene(**values)
    return jittered(scene, rng) if rng is not None else scene


# --------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Landmarks:
    """Where the face is in a render, in output pixels: eyes, nose tip, mouth centre, and the
    face ellipse (centre, half axes, rotation in degrees)."""

    left_eye: tuple[float, float]
    right_eye: tuple[float, float]
    nose: tuple[float, float]
    mouth: tuple[float, float]
    face_center: tuple[float, float]
    face_axes: tuple[float, float]
    rotation: float

    def as_array(self) -> np.ndarray:
        """(5, 2) float32: left eye, right eye, nose, mouth, face centre (x, y)."""
        return np.array([self.left_eye, self.right_eye, self.nose, self.mouth, self.face_center], dtype=np.float32)


def _mix(a: tuple[int, ...], b: tuple[int, ...], t: float) -> tuple[int, ...]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _background(setting: str, side: int, rng: np.random.Generator) -> Image.Image:
    """The setting, drawn on a ``side``² canvas."""
    img = Image.new("RGB", (side, side))
    d = ImageDraw.Draw(img)
    s = side
    if setting == "beach":
        for y in range(s):
            t = y / s
            d.line([(0, y), (s, y)], fill=_mix((120, 190, 240), (200, 230, 250), t * 1.6) if t < 0.55 else (40, 120, 190) if t < 0.68 else (230, 206, 150))
        d.ellipse([s * 0.72, s * 0.06, s * 0.9, s * 0.24], fill=(255, 236, 120))
    elif setting == "forest":
        d.rectangle([0, 0, s, s], fill=(70, 120, 60))
        for _ in range(9):
            x = rng.uniform(0, s)
            w = rng.uniform(0.04, 0.08) * s
            d.rectangle([x, 0, x + w, s], fill=(80, 56, 36))
        for _ in range(14):
            x, y = rng.uniform(0, s), rng.uniform(0, s * 0.5)
            r = rng.uniform(0.08, 0.16) * s
            d.ellipse([x - r, y - r, x + r, y + r], fill=(40, 100 + int(rng.uniform(0, 40)), 40))
        d.rectangle([0, s * 0.85, s, s], fill=(60, 90, 40))
    elif setting == "snowy mountain":
        d.rectangle([0, 0, s, s], fill=(150, 180, 220))
        for cx, h in ((0.2, 0.75), (0.55, 0.6), (0.9, 0.7)):
            peak = (cx * s, (1 - h) * s)
            d.polygon([(peak[0] - 0.45 * s, s), peak, (peak[0] + 0.45 * s, s)], fill=(110, 110, 126))
            d.polygon([(peak[0] - 0.12 * s, peak[1] + 0.14 * s), peak, (peak[0] + 0.12 * s, peak[1] + 0.14 * s)], fill=(250, 250, 255))
        d.rectangle([0, s * 0.82, s, s], fill=(245, 248, 255))
    elif setting == "city at night":
        d.rectangle([0, 0, s, s], fill=(14, 18, 48))
        x = 0.0
        while x < s:
            w = rng.uniform(0.1, 0.2) * s
            top = rng.uniform(0.2, 0.55) * s
            d.rectangle([x, top, x + w - 2, s], fill=(34, 36, 60))
            for wy in np.arange(top + 0.03 * s, s, 0.07 * s):
                for wx in np.arange(x + 0.02 * s, x + w - 0.04 * s, 0.05 * s):
                    if rng.uniform() < 0.55:
                        d.rectangle([wx, wy, wx + 0.025 * s, wy + 0.03 * s], fill=(250, 210, 90))
            x += w
    elif setting == "red wall":
        d.rectangle([0, 0, s, s], fill=(178, 40, 36))
        for row, y in enumerate(np.arange(0, s, 0.08 * s)):
            d.line([(0, y), (s, y)], fill=(120, 24, 22), width=max(1, s // 96))
            off = 0.06 * s if row % 2 else 0
            for x in np.arange(off, s, 0.12 * s):
                d.line([(x, y), (x, y + 0.08 * s)], fill=(120, 24, 22), width=max(1, s // 96))
    elif setting == "blue studio":
        for y in range(s):
            d.line([(0, y), (s, y)], fill=_mix((70, 110, 190), (30, 50, 110), y / s))
    else:
        raise ToyPromptError(f"unknown setting {setting!r}")
    return img


def _draw_head(ident: Identity, scene: Scene, s: int, rng: np.random.Generator) -> tuple[Image.Image, dict[str, tuple[float, float]]]:
    """The head on a transparent ``s``² canvas, centred, upright; returns it and its points."""
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy = s * 0.5, s * 0.54
    fw = ident.face_width * s
    fh = fw * ident.face_aspect
    hw, hh = fw / 2, fh / 2
    hair = ident.hair_colour + (255,)
    skin = ident.skin + (255,)
    # hair behind the head
    if ident.hair_style == "long":
        d.rounded_rectangle([cx - hw * 1.3, cy - hh * 1.15, cx + hw * 1.3, cy + hh * 1.35], radius=hw * 0.6, fill=hair)
    elif ident.hair_style == "bob":
        d.rounded_rectangle([cx - hw * 1.25, cy - hh * 1.15, cx + hw * 1.25, cy + hh * 0.55], radius=hw * 0.5, fill=hair)
    elif ident.hair_style == "curly":
        for k in range(14):
            a = math.pi * (0.95 + 1.1 * k / 13)
            r = hw * 0.38
            px, py = cx + math.cos(a) * hw * 1.05, cy - hh * 0.25 + math.sin(a) * hh * 0.95
            d.ellipse([px - r, py - r, px + r, py + r], fill=hair)
    # neck and shoulders
    d.rectangle([cx - hw * 0.38, cy + hh * 0.6, cx + hw * 0.38, cy + hh * 1.4], fill=_mix(ident.skin, (0, 0, 0), 0.12) + (255,))
    d.ellipse([cx - hw * 2.2, cy + hh * 1.15, cx + hw * 2.2, cy + hh * 2.6], fill=(70, 80, 96, 255))
    # the face: an ellipse whose lower half narrows with the chin value
    top = [cx - hw, cy - hh, cx + hw, cy + hh]
    d.ellipse(top, fill=skin)
    jaw = hw * (1.0 - 0.35 * ident.chin)
    d.polygon([(cx - hw * 0.98, cy), (cx + hw * 0.98, cy), (cx + jaw * 0.7, cy + hh * 0.8), (cx, cy + hh * 1.02), (cx - jaw * 0.7, cy + hh * 0.8)], fill=skin)
    if ident.chin > 0.5:  # a pointed chin trims the ellipse's round bottom
        d.ellipse([cx - hw * 0.2, cy + hh * 0.9, cx + hw * 0.2, cy + hh * 1.04], fill=skin)
    # hair on top
    if ident.hair_style in ("short", "curly", "long", "bob"):
        d.chord([cx - hw * 1.04, cy - hh * 1.1, cx + hw * 1.04, cy - hh * 0.1], 180, 360, fill=hair)
        if ident.hair_style == "short":
            d.rectangle([cx - hw * 1.02, cy - hh * 0.62, cx - hw * 0.86, cy - hh * 0.15], fill=hair)
            d.rectangle([cx + hw * 0.86, cy - hh * 0.62, cx + hw * 1.02, cy - hh * 0.15], fill=hair)
    # eyes
    ey = cy - ident.eye_height * fh
    ex = ident.eye_spacing * fw / 2
    er = ident.eye_size * fw / 2 * (1.3 if scene.expression == "surprised" else 1.0)
    points: dict[str, tuple[float, float]] = {}
    for side, name in ((-1, "left_eye"), (1, "right_eye")):
        x = cx + side * ex
        d.ellipse([x - er * 1.5, ey - er, x + er * 1.5, ey + er], fill=(250, 250, 250, 255))
        d.ellipse([x - er * 0.8, ey - er * 0.8, x + er * 0.8, ey + er * 0.8], fill=ident.eye_colour + (255,))
        d.ellipse([x - er * 0.35, ey - er * 0.35, x + er * 0.35, ey + er * 0.35], fill=(10, 10, 10, 255))
        points[name] = (x, ey)
        # brow
        lift = er * (1.4 if scene.expression == "surprised" else 0.0)
        by = ey - er * 1.9 - lift
        tilt = math.radians(ident.brow_tilt) * side
        bl = er * 1.8
        thick = max(1.0, ident.brow_thickness * fw)
        d.line([(x - bl, by + math.sin(tilt) * bl), (x + bl, by - math.sin(tilt) * bl)], fill=_mix(ident.hair_colour, (20, 20, 20), 0.4) + (255,), width=int(round(thick)))
    # nose
    ny = ey + ident.nose_length * fh
    nw = ident.nose_width * fw / 2
    d.polygon([(cx, ey + er * 0.6), (cx - nw, ny), (cx + nw, ny)], fill=_mix(ident.skin, (0, 0, 0), 0.18) + (255,))
    points["nose"] = (cx, ny)
    # mouth
    my = ny + (cy + hh - ny) * 0.42
    mw = ident.mouth_width * fw / 2
    lip = ident.lip_colour + (255,)
    lw = max(1, int(round(fw * 0.035)))
    if scene.expression == "smiling":
        d.chord([cx - mw, my - mw * 0.55, cx + mw, my + mw * 0.55], 0, 180, fill=(120, 30, 40, 255), outline=lip, width=lw)
        d.rectangle([cx - mw * 0.7, my, cx + mw * 0.7, my + mw * 0.12], fill=(250, 250, 250, 255))
    elif scene.expression == "surprised":
        r = mw * 0.42
        d.ellipse([cx - r, my - r * 1.2, cx + r, my + r * 1.2], fill=(80, 20, 30, 255), outline=lip, width=lw)
    else:
        d.line([(cx - mw, my), (cx + mw, my)], fill=lip, width=lw + 1)
    points["mouth"] = (cx, my)
    # mark
    if ident.mark == "mole":
        mx, myy = cx + ident.mark_position[0] * fw, cy + ident.mark_position[1] * fw
        r = fw * 0.03
        d.ellipse([mx - r, myy - r, mx + r, myy + r], fill=(60, 34, 24, 255))
    elif ident.mark == "freckles":
        frng = np.random.default_rng(ident.freckle_seed)
        for _ in range(14):
            side = frng.choice([-1, 1])
            fx = cx + side * frng.uniform(0.12, 0.42) * fw
            fy = ey + frng.uniform(0.1, 0.3) * fh
            r = fw * 0.014
            d.ellipse([fx - r, fy - r, fx + r, fy + r], fill=_mix(ident.skin, (90, 40, 20), 0.55) + (255,))
    # headwear
    if scene.headwear == "red hat":
        d.rectangle([cx - hw * 1.5, cy - hh * 0.95, cx + hw * 1.5, cy - hh * 0.8], fill=(200, 30, 34, 255))
        d.rounded_rectangle([cx - hw * 0.85, cy - hh * 1.75, cx + hw * 0.85, cy - hh * 0.85], radius=hw * 0.2, fill=(210, 36, 40, 255))
    elif scene.headwear == "crown":
        base_y = cy - hh * 0.85
        pts = [(cx - hw * 0.85, base_y)]
        for k in range(5):
            x0 = cx - hw * 0.85 + k * hw * 0.425
            pts += [(x0, base_y - hh * 0.25), (x0 + hw * 0.21, base_y - hh * 0.6)]
        pts += [(cx + hw * 0.85, base_y - hh * 0.25), (cx + hw * 0.85, base_y)]
        d.polygon(pts, fill=(240, 196, 40, 255))
        d.ellipse([cx - hw * 0.12, base_y - hh * 0.2, cx + hw * 0.12, base_y - hh * 0.04], fill=(200, 20, 60, 255))
    elif scene.headwear == "beanie":
        d.chord([cx - hw * 1.08, cy - hh * 1.35, cx + hw * 1.08, cy - hh * 0.05], 180, 360, fill=(40, 140, 130, 255))
        d.rectangle([cx - hw * 1.08, cy - hh * 0.75, cx + hw * 1.08, cy - hh * 0.5], fill=(30, 110, 100, 255))
        d.ellipse([cx - hw * 0.2, cy - hh * 1.5, cx + hw * 0.2, cy - hh * 1.22], fill=(230, 230, 230, 255))
    # eyewear
    if scene.eyewear in ("glasses", "sunglasses"):
        r = max(er * 1.9, fw * 0.1)
        frame = (20, 20, 24, 255)
        fill = (16, 16, 20, 255) if scene.eyewear == "sunglasses" else None
        w = max(1, int(round(fw * 0.03)))
        for side in (-1, 1):
            x = cx + side * ex
            d.ellipse([x - r, ey - r * 0.8, x + r, ey + r * 0.8], outline=frame, fill=fill, width=w)
        d.line([(cx - ex + r, ey), (cx + ex - r, ey)], fill=frame, width=w)
    points["face_center"] = (cx, cy)
    points["face_axes"] = (hw, hh)
    return layer, points


def _apply_style(img: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    """The style of the whole picture, on the final-size RGB image."""
    a = np.asarray(img).astype(np.float32)
    h, w = a.shape[:2]
    if style == "photo":
        shade = np.linspace(1.06, 0.9, h, dtype=np.float32)[:, None, None]
        a = a * shade + rng.normal(0, 2.0, a.shape)
    elif style == "oil painting":
        a = np.asarray(Image.fromarray(a.clip(0, 255).astype(np.uint8)).filter(ImageFilter.ModeFilter(3))).astype(np.float32)
        a = np.round(a / 42) * 42
        strokes = rng.normal(0, 1, (h, w // 2 + 1))
        strokes = np.repeat(strokes, 2, axis=1)[:, :w]
        a = a * 0.85 + np.array([40, 26, 6], np.float32) + strokes[..., None] * 14
    elif style == "pencil sketch":
        grey = np.asarray(Image.fromarray(a.clip(0, 255).astype(np.uint8)).convert("L")).astype(np.float32)
        edges = np.asarray(Image.fromarray(grey.astype(np.uint8)).filter(ImageFilter.FIND_EDGES)).astype(np.float32)
        tone = 255 - (255 - grey) * 0.35
        paper = 236 + rng.normal(0, 3, grey.shape)
        g = np.minimum(tone, paper) - edges * 1.4
        hatch = ((np.add.outer(np.arange(h), np.arange(w)) % 4) == 0) & (grey < 110)
        g = np.where(hatch, g - 25, g)
        a = np.repeat(g[..., None], 3, axis=2) * np.array([1.0, 0.98, 0.94], np.float32)
    elif style == "pixel art":
        cells = max(4, w // 3)
        small = Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((cells, cells), Image.BOX)
        q = np.round(np.asarray(small).astype(np.float32) / 64) * 64
        a = np.asarray(Image.fromarray(q.clip(0, 255).astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.float32)
        a[:: max(1, h // cells), :, :] *= 0.82
        a[:, :: max(1, w // cells), :] *= 0.82
    elif style == "watercolor":
        blurred = np.asarray(Image.fromarray(a.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(max(0.6, w / 100)))).astype(np.float32)
        grey = blurred.mean(axis=2, keepdims=True)
        washed = grey + (blurred - grey) * 0.8
        blotch = np.asarray(Image.fromarray((rng.uniform(0, 255, (8, 8))).astype(np.uint8)).resize((w, h), Image.BICUBIC)).astype(np.float32)
        a = washed * 0.68 + 255 * 0.32 - (blotch[..., None] - 128) * 0.2
        a = a + np.array([0, 2, 8], np.float32)
    else:
        raise ToyPromptError(f"unknown style {style!r}")
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def render(identity: Identity | int, scene: Scene, size: int = NATIVE_SIZE, seed: int = 0,
           with_landmarks: bool = False) -> Image.Image | tuple[Image.Image, Landmarks]:
    """The portrait of ``identity`` in ``scene`` as a ``size``² RGB image (deterministic in ``seed``).

    With ``with_landmarks``: also where its face is (:class:`Landmarks`, output pixels).
    """
    ident = identity if isinstance(identity, Identity) else Identity.from_number(int(identity))
    rng = np.random.default_rng([ident.number, seed, 104729])
    s = size * _SUPERSAMPLE
    canvas = _background(scene.setting, s, rng).convert("RGBA")
    head, points = _draw_head(ident, scene, s, rng)
    angle = scene.rotation
    head = head.rotate(angle, resample=Image.BICUBIC, center=(s / 2, s / 2))
    scaled = int(round(s * scene.scale))
    head = head.resize((scaled, scaled), Image.BICUBIC)
    ox = int(round(s / 2 + scene.dx * s - scaled / 2))
    oy = int(round(s / 2 + scene.dy * s - scaled / 2))
    canvas.alpha_composite(head, (ox, oy)) if ox >= 0 and oy >= 0 else canvas.paste(head, (ox, oy), head)
    img = canvas.convert("RGB").resize((size, size), Image.LANCZOS)
    img = _apply_style(img, scene.style, rng)
    if not with_landmarks:
        return img

    def place(p: tuple[float, float]) -> tuple[float, float]:
        # rotate about the canvas centre (PIL's rotate is counter-clockwise on screen), scale, shift
        x, y = p[0] - s / 2, p[1] - s / 2
        t = math.radians(angle)
        xr, yr = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
        return ((xr * scene.scale + s / 2 + scene.dx * s) / _SUPERSAMPLE,
                (yr * scene.scale + s / 2 + scene.dy * s) / _SUPERSAMPLE)

    axes = tuple(v * scene.scale / _SUPERSAMPLE for v in points["face_axes"])
    marks = Landmarks(
        left_eye=place(points["left_eye"]), right_eye=place(points["right_eye"]), nose=place(points["nose"]),
        mouth=place(points["mouth"]), face_center=place(points["face_center"]), face_axes=axes,  # type: ignore[arg-type]
        rotation=angle,
    )
    return img, marks


def render_background(scene: Scene, size: int = NATIVE_SIZE, seed: int = 0) -> Image.Image:
    """The scene with nobody in it (negatives for the face locator)."""
    rng = np.random.default_rng([seed, 15485863])
    img = _background(scene.setting, size * _SUPERSAMPLE, rng).resize((size, size), Image.LANCZOS)
    return _apply_style(img, scene.style, rng)


def render_prompt(identity: int, prompt: str, seed: int = 0, size: int = NATIVE_SIZE) -> Image.Image:
    """Ground truth for a prompt: ``{}`` = the identity, scene from :func:`parse_prompt`, jitter from ``seed``."""
    scene = scene_for_prompt(prompt, np.random.default_rng([seed, 31]))
    return render(identity, scene, size=size, seed=seed)  # type: ignore[return-value]


def describe(identity: int) -> dict[str, Any]:
    """The features of an identity as plain values (for docs and debugging)."""
    ident = Identity.from_number(identity)
    return {k: v for k, v in ident.__dict__.items() if k != "traits"} | {"traits": list(ident.traits)}
