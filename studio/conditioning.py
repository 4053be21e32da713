"""Text conditions with identity tokens, and the per-step stage schedule (docs/ALGORITHM.md, "Stages" and "Generation").

A prompt names the person with ``{}``. It is tokenised with K identity *slots* in place of
``{}``; the slots get the mapper's vectors at embedding time (``studio.attention``). The
shared tokenizer and embedding table are never changed: slots carry the super-category id,
and a boolean mask says where they are.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer

from studio import attention
from studio.backbone import Backbone
from studio.errors import StudioError

PLACEHOLDER = "{}"


class PromptError(StudioError, ValueError):
    """A prompt cannot be used; the message says how to fix it."""


def check_prompt(prompt: str, require_identity: bool = True) -> str:
    """Strip and validate a user prompt; ``{}`` marks the person."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise PromptError("The prompt is empty. Describe the picture, with {} for the person, e.g. 'a photo of {} as a chef'.")
    count = prompt.count(PLACEHOLDER)
    if require_identity and count == 0:
        raise PromptError(
            "The prompt has no {} for the person: put {} where the person goes, in place of words such as "
            "'a woman' or 'me' (e.g. 'a photo of {} on the beach')."
        )
    if count > 1:
        raise PromptError("Use {} once per prompt: it stands for the whole person.")
    return prompt


def super_category_id(tokenizer: CLIPTokenizer, word: str) -> int:
    """The vocabulary id of the super-category word; it must be exactly one CLIP token."""
    ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise PromptError(
            f"The super-category {word!r} is {len(ids)} CLIP tokens ({' '.join(pieces)}), not one. "
            f"Use a common single word such as 'face', 'man', 'woman' or 'person'."
        )
    return ids[0]


def tokenize(
    tokenizer: CLIPTokenizer, prompts: list[str], num_slots: int, slot_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> input_ids (B, L) and identity mask (B, L), with ``num_slots`` slots at ``{}``.

    With ``num_slots == 0`` the ``{}`` becomes the super-category word itself (``slot_id``).
    """
    length = tokenizer.model_max_length
    rows, masks = [], []
    for prompt in prompts:
        before, _, after = prompt.partition(PLACEHOLDER)
        head = tokenizer(before, add_special_tokens=False).input_ids
        tail = tokenizer(after, add_special_tokens=False).input_ids if PLACEHOLDER in prompt else []
        slots = [slot_id] * num_slots if num_slots else ([slot_id] if PLACEHOLDER in prompt else [])
        ids = [tokenizer.bos_token_id, *head, *slots, *tail, tokenizer.eos_token_id]
        if len(ids) > length:
            raise PromptError(
                f"The prompt is too long: {len(ids)} tokens, the text encoder reads {length}. Shorten it."
            )
        mask = [False] * (1 + len(head)) + [True] * (len(slots) if num_slots else 0)
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
        masks.append(mask + [False] * (length - len(mask)))
    return torch.tensor(rows), torch.tensor(masks)


@dataclass
class TextStates:
    """Output of one text-encoder pass.

    hidden: (B, L, D) final states (UNet keys, and values without bypass).
    values: (B, L, D) bypassed final states for the UNet's values, or None.
    attention: (B, H, L, L) last-layer self-attention probabilities, when captured.
    """

    hidden: torch.Tensor
    values: torch.Tensor | None = None
    attention: torch.Tensor | None = None


def encode_text(
    backbone: Backbone,
    input_ids: torch.Tensor,
    identity_mask: torch.Tensor | None = None,
    identity: torch.Tensor | None = None,
    bypass: torch.Tensor | None = None,
    balance: float = 1.0,
    balance_layers: int = 1,
    capture_attention: bool = False,
) -> TextStates:
    """Run the text encoder with identity tokens injected.

    Args:
        input_ids: (B, L) from :func:`tokenize`; identity_mask: (B, L) bool slot positions.
        identity: (B, K, D) token vectors for the K slots of each row (mapper output).
        bypass: (B, K, D) image-bypass residuals b_i, applied to the last hidden states.
        balance: gamma; keys at identity positions get ``log gamma`` in the last ``balance_layers``.
        capture_attention: return the last layer's self-attention probabilities (with grad).
    """
    encoder = backbone.text_encoder
    device = backbone.device
    input_ids = input_ids.to(device)
    injection = None
    if identity is not None:
        identity_mask = identity_mask.to(device)
        injection = attention.TokenInjection(identity_mask, identity)
    key_bias = attention.balance_bias(identity_mask.to(device), balance) if identity_mask is not None else None
    control = attention.TextAttentionControl(key_bias=key_bias, bias_layers=balance_layers, capture=capture_attention)
    with attention.text_encoder_context(injection, control):
        out = encoder(input_ids=input_ids, output_hidden_states=bypass is not None)
    states = TextStates(hidden=out.last_hidden_state, attention=control.captured)
    if bypass is not None:
        # h' = |h| * normalize(h + b) at identity positions, on the states before the final norm.
        pre_norm = out.hidden_states[-1]
        residual = torch.zeros_like(pre_norm).masked_scatter(
            identity_mask[..., None].expand_as(pre_norm), bypass.to(pre_norm.dtype)
        )
        moved = pre_norm.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(pre_norm + residual, dim=-1)
        states.values = encoder.final_layer_norm(torch.where(identity_mask[..., None], moved, pre_norm))
    return states


# --------------------------------------------------------------------------- stages
class Stage(enum.Enum):
    EARLY = "early"  # t > band end: super-category prompt
    DYNAMIC = "dynamic"  # band start <= t <= band end: identity = MLP(t)
    LATE = "late"  # t < band start: MLP(band start), or the super-category prompt


@dataclass(frozen=True)
class StageSchedule:
    """Which text condition each denoising timestep gets (docs/ALGORITHM.md, "Stages")."""

    band: tuple[int, int]
    late_stage: str = "band_edge"

    def stage(self, t: int) -> Stage:
        lo, hi = self.band
        if t > hi:
            return Stage.EARLY
        return Stage.DYNAMIC if t >= lo else Stage.LATE

    def mapper_timestep(self, t: int) -> int | None:
        """The timestep fed to the mapper at denoising step ``t``; None = super-category prompt."""
        stage = self.stage(t)
        if stage is Stage.DYNAMIC:
            return int(t)
        if stage is Stage.LATE and self.late_stage == "band_edge":
            return self.band[0]
        return None
