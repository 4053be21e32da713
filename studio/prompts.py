"""Training prompts (SPEC §4). ``{}`` stands for the identity slots ``<id1> … <idK>``.

RECONSTRUCTION_TEMPLATES condition the masked reconstruction loss: plain descriptions of a
photo of the person, in the style of textual inversion, so the identity tokens absorb the
person and not a scene. TANDEM_PROMPTS feed the Tandem Equilibrium term: each puts the person
beside a scene, action or object word that must keep its share of the text encoder's
attention.
"""
from __future__ import annotations

RECONSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "the photo of {}",
    "a photo of a clean {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of {}",
    "a clean photo of {}",
    "a nice photo of {}",
    "a photo of the nice {}",
    "a dark photo of {}",
    "a portrait of {}",
)

TANDEM_PROMPTS: tuple[str, ...] = (
    "{} is reading a book",
    "{} is playing the guitar",
    "{} wearing a red hat",
    "{} on the beach",
    "{} in the snow",
    "{} is cooking in a kitchen",
    "{} riding a bicycle",
    "{} wearing sunglasses",
    "{} in a forest",
    "{} is drinking coffee",
    "{} as a painting by van gogh",
    "{} wearing a suit and tie",
    "{} in front of the eiffel tower",
    "{} is swimming in a pool",
    "{} holding a cat",
    "{} on a city street at night",
    "{} wearing a spacesuit",
    "{} is smiling",
    "{} in a pixar animation",
    "{} sitting on a sofa",
)
