"""Identity and prompt scores of generated images (docs/ALGORITHM.md, "Evaluation"), each naming the model behind it.

- **Identity**: the face backend's similarity (``studio.faces``; dlib or insightface) between
  the largest face in the image and each reference photo, averaged over the references.
  On the 0..1 scale of :meth:`FaceAnalyzer.similarity` (1 = the same face; 0.5 = the
  backend's same-person threshold). An image without a detectable face is its own outcome,
  ``face_found=False`` with ``similarity=None``; it is never scored as 0.
- **Prompt**: CLIPScore (Hessel et al. 2021, as torchmetrics computes it):
  ``100 * max(cos(text, image), 0)`` between CLIP's projected text and image embeddings.
  The text is the user prompt with ``{}`` replaced by the super-category word ("a photo of
  {} as a chef" -> "a photo of face as a chef"): what the prompt asks for, minus the person.
  The CLIP model is a hub id, a local folder, or ``"tiny"``: a small random-weight CLIP built
  from a config (offline tests and the tiny preset; its scores are reproducible but mean
  nothing).

Models are loaded once per process and shared (thread-safe); :class:`Scorer` is cheap.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
)

from studio.backbone import (
    Backbone,
    BackboneUnavailable,
    hub_snapshot,
    looks_like_hub_id,
    seeded_init,
    load_tokenizer,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)
from studio.conditioning import PLACEHOLDER
from studio.config import FaceConfig
from studio.faces import FaceAnalyzer, PhotoError, PhotoSource, get_face_analyzer, identity_embedding
from studio.toy.instruments import TOY_PROMPT_MODEL, ToyPromptModel

TINY_CLIP = "tiny"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# Only these files are fetched for a hub CLIP: safetensors weights, configs, tokenizer.
_CLIP_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
]
# Images per CLIP forward: bounds memory for the large CLIP on long sweeps.
_CLIP_BATCH = 16


class ClipUnavailable(BackboneUnavailable):
    """The CLIP model for prompt scores cannot be loaded; the message says how to get it."""


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class IdentityScore:
    """Identity similarity of one image to the reference photos.

    similarity: mean face-backend similarity in [0, 1] over the references; None when no face
    was found or no reference was given. face_found: a face was detected in the image.
    model: the face backend that produced it ("dlib", "insightface").
    """

    similarity: float | None
    face_found: bool
    model: str


@dataclass(frozen=True)
class PromptScore:
    """CLIPScore of one image against its prompt: ``100 * max(cos, 0)``, so 0..100."""

    score: float
    model: str
    # the raw cosine -1..1 (a random tiny CLIP often gives negative cosines, all scored 0)
    cosine: float = 0.0
    # the text CLIP compared with the image ({} replaced by the super-category word)
    text: str = ""


@dataclass(frozen=True)
class ImageScores:
    """Both scores of one generated image."""

    identity: IdentityScore
    prompt: PromptScore

    @property
    def caption(self) -> str:
        """Short text for an image caption, e.g. ``id 0.71 · prompt 24.3`` or ``no face · prompt 24.3``."""
        return caption(self)


def caption(scores: ImageScores) -> str:
    """``id 0.71 · prompt 24.3``; ``no face · …`` when no face was found; ``face · …`` without references."""
    identity = scores.identity
    if not identity.face_found:
        head = "no face"
    elif identity.similarity is None:
        head = "face"
    else:
        head = f"id {identity.similarity:.2f}"
    return f"{head} · prompt {scores.prompt.score:.1f}"


def clip_score(cosine: float) -> float:
    """CLIPScore from a CLIP cosine: ``100 * max(cos, 0)`` (torchmetrics' convention)."""
    return 100.0 * max(cosine, 0.0)


def scoring_text(prompt: str, super_category: str) -> str:
    """The text a prompt is scored against: ``{}`` replaced by the super-category word."""
    return " ".join(prompt.replace(PLACEHOLDER, super_category.strip()).split())


def default_clip_model(backbone: Backbone | str) -> str:
    """The prompt scorer for a backbone (or its model source): ``"tiny"`` for the random tiny
    backbone (its images are noise), the attribute classifiers for the toy one, else ViT-L/14."""
    source = backbone if isinstance(backbone, str) else backbone.source
    return {"toy": TOY_PROMPT_MODEL, "tiny": TINY_CLIP}.get(source, DEFAULT_CLIP)


# ----------------------------------------------------------------------------- CLIP
@dataclass(frozen=True, eq=False)
class ClipModel:
    """A loaded CLIP (read-only, shared): model, tokenizer and image processor."""

    name: str
    model: CLIPModel
    tokenizer: CLIPTokenizer
    # the PIL processor: CLIPImageProcessor wants torchvision and otherwise falls back to it with a warning
    processor: CLIPImageProcessorPil
    device: torch.device

    @torch.inference_mode()
    def cosines(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Cosine (N,) between CLIP's embedding of each image and of the text at the same index."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: give one text per image")
        out: list[float] = []
        for start in range(0, len(images), _CLIP_BATCH):
            batch_images = [im.convert("RGB") for im in images[start : start + _CLIP_BATCH]]
            batch_texts = list(texts[start : start + _CLIP_BATCH])
            tokens = self.tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt")
            pixels = self.processor(images=batch_images, return_tensors="pt").pixel_values
            result = self.model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device),
                pixel_values=pixels.to(self.device, self.model.dtype),
            )
            # text_embeds / image_embeds come back L2-normalised: the row-wise dot is the cosine.
            cosine = (result.text_embeds * result.image_embeds).sum(dim=-1).float()
            out += cosine.tolist()
        return out


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessorPil]:
    """A small random-weight CLIP (width 32, 2 layers, 32 px images) with the real tokenizer."""
    tokenizer = load_tokenizer()
    with seeded_init(seed):
        model = CLIPModel(
            CLIPConfig(
                text_config=tiny_text_config(tokenizer).to_dict(),
                vision_config=tiny_vision_config().to_dict(),
                projection_dim=32,
            )
        )
    processor = tiny_image_processor()
    return model, tokenizer, processor


def _clip_folder(source: str) -> str:
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if not looks_like_hub_id(source):
        raise ClipUnavailable(f"CLIP model {source!r} is neither a folder, a hub id (owner/name) nor 'tiny'")
    try:
        return hub_snapshot(source, None, _CLIP_PATTERNS)
    except BackboneUnavailable as exc:
        reason = exc.reason  # the cause alone; the advice below is CLIP's own
        raise ClipUnavailable(
            f"The CLIP model {source!r} for prompt scores is not available. Download it where there is internet "
            f"(`hf download {source} --local-dir models/{source.split('/')[-1]}`) and pass that folder as the CLIP "
            f"model, or use 'tiny' (random weights: runs offline, scores mean nothing). Cause: {reason}."
        ) from None


def _load_clip(source: str, device: torch.device) -> ClipModel | ToyPromptModel:
    if source == TOY_PROMPT_MODEL:
        return ToyPromptModel()
    if source == TINY_CLIP:
        model, tokenizer, processor = tiny_clip()
        name = "tiny-clip (random weights)"
    else:
        folder = _clip_folder(source)
        try:
            model = CLIPModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
            processor = CLIPImageProcessorPil.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ClipUnavailable(f"could not load the CLIP model {source!r}: {exc}") from None
        name = source
    model.requires_grad_(False).eval().to(device)
    return ClipModel(name=name, model=model, tokenizer=tokenizer, processor=processor, device=device)


_CLIP_CACHE: dict[tuple[str, str], ClipModel | ToyPromptModel] = {}
_CLIP_LOCK = threading.Lock()


def get_clip(source: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> ClipModel | ToyPromptModel:
    """The process-wide prompt scorer for ``source`` ("tiny", "toy", a CLIP hub id or folder);
    raises :class:`ClipUnavailable`."""
    device = torch.device(device)
    key = (source, str(device))
    with _CLIP_LOCK:
        if key not in _CLIP_CACHE:
            _CLIP_CACHE[key] = _load_clip(source, device)
        return _CLIP_CACHE[key]


# ----------------------------------------------------------------------------- identity
def identity_score(image: PhotoSource, references: Sequence[np.ndarray], analyzer: FaceAnalyzer) -> IdentityScore:
    """Mean similarity of the largest face in ``image`` to each reference embedding (D,)."""
    embedding = identity_embedding(image, analyzer)
    if embedding is None:
        return IdentityScore(similarity=None, face_found=False, model=analyzer.name)
    if not references:
        return IdentityScore(similarity=None, face_found=True, model=analyzer.name)
    similarity = float(np.mean([analyzer.similarity(embedding, ref) for ref in references]))
    return IdentityScore(similarity=similarity, face_found=True, model=analyzer.name)


# ----------------------------------------------------------------------------- scorer
class Scorer:
    """Scores generated images for identity and prompt fidelity.

    Cheap to make: the face analyzer and CLIP are process-wide and loaded on first use.
    Thread-safe: several sessions may score at once.
    """

    def __init__(self, face: FaceConfig, clip_model: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> None:
        self.face_config = face
        self.clip_model = clip_model
        self.device = torch.device(device)

    @classmethod
    def for_backbone(cls, backbone: Backbone, face: FaceConfig, clip_model: str | None = "auto") -> Scorer:
        """A scorer on the backbone's device; CLIP ``"auto"`` / None = :func:`default_clip_model`."""
        chosen = default_clip_model(backbone) if clip_model in (None, "auto") else clip_model
        return cls(face, chosen, backbone.device)

    @property
    def analyzer(self) -> FaceAnalyzer:
        return get_face_analyzer(self.face_config)

    @property
    def clip(self) -> ClipModel:
        return get_clip(self.clip_model, self.device)

    def embed_references(self, photos: Sequence[PhotoSource | np.ndarray]) -> list[np.ndarray]:
        """Identity embeddings (D,) of reference photos; 1-D arrays are taken as embeddings.

        Raises PhotoError naming the photo when one shows no face (a reference must).
        """
        analyzer = self.analyzer
        embeddings = []
        for index, photo in enumerate(photos):
            if isinstance(photo, np.ndarray) and photo.ndim == 1:
                if photo.shape[0] != analyzer.embedding_dim:
                    # e.g. photos prepared with insightface (512-D) scored with dlib (128-D)
                    raise PhotoError(
                        f"Reference embedding {index + 1} has {photo.shape[0]} values but the {analyzer.name} face "
                        f"backend makes {analyzer.embedding_dim}: prepare the photos with the same face backend."
                    )
                embeddings.append(photo.astype(np.float32))
                continue
            embedding = identity_embedding(photo, analyzer, self.face_config.max_pixels)  # the preset's size limit
            if embedding is None:
                name = Path(photo).name if isinstance(photo, (str, Path)) else f"reference photo {index + 1}"
                raise PhotoError(f"No face was found in {name}; a reference photo must show the person's face.")
            embeddings.append(embedding)
        return embeddings

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        references: Sequence[PhotoSource | np.ndarray] = (),
        super_category: str = "face",
    ) -> list[ImageScores]:
        """Scores of each image against the prompt at the same index (with ``{}``) and the references.

        references: reference photos or their identity embeddings (D,) (see :meth:`embed_references`;
        pass embeddings when scoring many batches). Empty: identity similarity is None.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        reference_embeddings = self.embed_references(references)
        analyzer = self.analyzer
        texts = [scoring_text(p, super_category) for p in prompts]
        clip = self.clip
        cosines = clip.cosines(images, texts)
        return [
            ImageScores(
                identity=identity_score(image, reference_embeddings, analyzer),
                prompt=PromptScore(score=clip_score(cosine), model=clip.name, cosine=cosine, text=text),
            )
            for image, text, cosine in zip(images, texts, cosines)
        ]


def score_quietly(
    scorer: Callable[[], Scorer], images: Sequence[Image.Image], prompts: Sequence[str],
    references: Sequence[np.ndarray], super_category: str,
) -> tuple[tuple[ImageScores, ...], str]:
    """(ImageScores per image, "") or ((), why scores are off): a scorer whose models cannot
    load (a missing CLIP) must not break previews or generation. ``scorer`` builds the Scorer."""
    if not images:
        return (), ""
    try:
        return tuple(scorer().score(list(images), list(prompts), list(references), super_category)), ""
    except Exception as exc:
        return (), f"Scores are off: {exc}"
