"""Training prompts (docs/ALGORITHM.md, "Losses"). ``{}`` stands for the identity slots ``<id1> … <idK>``.

RECONSTRUCTION_TEMPLATES condition the masked reconstruction loss: the standard textual-inversion
template list ("a photo of a {}", ...; the small ImageNet-style templates textual inversion and
NeTI train with), so the identity tokens absorb the person and not a scene. TANDEM_PROMPTS feed
the Tandem Equilibrium term: each puts the person beside a scene, action or object word that
must keep its share of the text encoder's attention. The two lists are kept apart on purpose.
"""
from __future__ import annotations

RECONSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
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
