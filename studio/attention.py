"""Attention hooks: the one place that reaches into the text encoder's and UNet's attention.

Installed once per backbone, and inert unless a call opts in through a context manager, so
the shared backbone is never mutated per call. State lives in ``contextvars``: each thread
(one per session) sees only its own settings.

Text encoder (transformers 5, registered attention function ``"studio"``):
  * identity-token injection: rows of the token-embedding output at placeholder positions are
    replaced by the mapper's vectors (gradients flow into the mapper only);
  * balance gamma: ``log(gamma)`` added to the attention logits of keys at identity positions
    in the last ``layers`` layers (docs/ALGORITHM.md, "Generation");
  * capture: the last layer's attention probabilities, with gradients (for the TE loss).
UNet: cross-attention takes keys from the plain text states and values from the bypassed
ones when ``cross_attention_kwargs={"value_states": ...}`` is given (docs/ALGORITHM.md, "Mapper", image bypass).
Within :func:`unet_context` (composition, docs/COMPOSE.md) the UNet's attention layers may also
record the reference pass's self-attention inputs, attend to them (reference-aware
self-attention), and restrict each region's pixels to its own group of text tokens and
references (region-grouped attention).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import AttentionInterface

ATTENTION_NAME = "studio"


@dataclass
class TokenInjection:
    """Replace token embeddings at ``mask`` positions: mask (B, L) bool, vectors (B, K, D)."""

    mask: torch.Tensor
    vectors: torch.Tensor


@dataclass
class TextAttentionControl:
    """Per-call settings of the text encoder's self-attention.

    key_bias: (B, L) additive logit bias for keys (``log gamma`` at identity positions, else 0).
    bias_layers: how many of the last layers get ``key_bias``.
    capture: keep the last layer's probabilities (B, H, L, L) in ``captured``.
    """

    key_bias: torch.Tensor | None = None
    bias_layers: int = 1
    capture: bool = False
    captured: torch.Tensor | None = None


_UNET_CONTROL: ContextVar["UNetAttentionControl | None"] = ContextVar("studio_unet_attention", default=None)
_INJECTION: ContextVar[TokenInjection | None] = ContextVar("studio_token_injection", default=None)
_CONTROL: ContextVar[TextAttentionControl | None] = ContextVar("studio_text_attention", default=None)


@contextlib.contextmanager
def text_encoder_context(
    injection: TokenInjection | None = None, control: TextAttentionControl | None = None
) -> Iterator[None]:
    """Within this block (this thread only), the text encoder injects tokens / applies control."""
    tokens = _INJECTION.set(injection), _CONTROL.set(control)
    try:
        yield
    finally:
        _INJECTION.reset(tokens[0])
        _CONTROL.reset(tokens[1])


def balance_bias(identity_mask: torch.Tensor, gamma: float) -> torch.Tensor | None:
    """(B, L) logit bias: ``log gamma`` at identity positions; None when gamma == 1."""
    if gamma == 1.0:
        return None
    return identity_mask.float() * math.log(gamma)


# --------------------------------------------------------------------------- text encoder
def _inject_tokens(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    injection = _INJECTION.get()
    if injection is None:
        return output
    mask = injection.mask[..., None].expand_as(output)
    return output.masked_scatter(mask, injection.vectors.to(output.dtype))


def _text_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal self-attention of CLIP's text encoder; q, k, v: (B, H, L, d) -> (B, L, H, d)."""
    control = _CONTROL.get()
    layer, num_layers = module._studio_layer, module._studio_num_layers
    bias = None
    if control is not None and control.key_bias is not None and layer >= num_layers - control.bias_layers:
        bias = control.key_bias[:, None, None, :].to(query.dtype)  # (B, 1, 1, L)
    capture = control is not None and control.capture and layer == num_layers - 1
    weights = None
    if bias is None and attention_mask is None and not capture:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        length = query.shape[-2]
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
        additive = torch.zeros(length, length, dtype=query.dtype, device=query.device).masked_fill(causal, float("-inf"))
        if bias is not None:
            additive = additive + bias
        if attention_mask is not None:
            additive = additive + attention_mask
        if capture:
            logits = torch.matmul(query, key.transpose(-1, -2)) * scaling + additive
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
            out = torch.matmul(weights, value)
            control.captured = weights
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=additive, scale=scaling)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION_NAME, _text_attention)


# --------------------------------------------------------------------------- UNet
class BypassAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor; cross-attention values may come from ``value_states`` and the
    text keys may carry a logit bias ``key_bias``.

    value_states: (B, L, D) text states used for the values only (keys stay the plain states).
    key_bias: (B, L) added to every cross-attention logit of those keys (``log gamma`` at the
        identity positions when the tandem balance acts in the UNet, docs/ALGORITHM.md).
    Both are cross-attention keywords: self-attention layers receive and ignore them.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 value_states=None, key_bias=None, **kwargs):
        control = _UNET_CONTROL.get()
        if control is not None and attention_mask is None and hidden_states.ndim == 3:
            return control.attend(attn, hidden_states, encoder_hidden_states, value_states)
        if (value_states is None and key_bias is None) or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.spatial_norm is not None or attn.group_norm is not None or attention_mask is not None:
            raise NotImplementedError("the image bypass and the UNet balance support SD 1.x cross-attention only")
        value_states = encoder_hidden_states if value_states is None else value_states
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            value_states = attn.norm_encoder_hidden_states(value_states)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(value_states)
        bias = None if key_bias is None else key_bias[:, None, None, :].to(query.dtype)  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(_heads(query, attn.heads), _heads(key, attn.heads), _heads(value, attn.heads),
                                             attn_mask=bias)
        out = _merge(out, query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> None:
    """Install the hooks on a freshly loaded backbone (once; they are inert until used)."""
    layers = [m for m in text_encoder.modules() if hasattr(m, "k_proj") and hasattr(m, "q_proj")]
    for index, module in enumerate(layers):
        module._studio_layer = index
        module._studio_num_layers = len(layers)
    text_encoder.set_attn_implementation(ATTENTION_NAME)
    text_encoder.get_input_embeddings().register_forward_hook(_inject_tokens)
    unet.set_attn_processor(BypassAttnProcessor())
    for name, module in unet.named_modules():
        if hasattr(module, "to_q") and hasattr(module, "processor"):
            module._studio_name = name  # e.g. "up_blocks.0.attentions.1.transformer_blocks.0.attn1"


# --------------------------------------------------------------------------- UNet: composition
@dataclass
class TextGroup:
    """The text condition of one region group (docs/COMPOSE.md, "Regions").

    hidden: (B, L, D) keys (and values); values: (B, L, D) bypassed values or None;
    key_bias: (B, L) additive logit bias, -inf at tokens this group's pixels must not see, or None.
    references: indices of the references this group's pixels attend to (None = all of them).
    """

    hidden: torch.Tensor
    values: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    references: tuple[int, ...] | None = None


@dataclass
class UNetAttentionControl:
    """Settings of the UNet's attention for one UNet call (docs/COMPOSE.md).

    record: keep the self-attention inputs (R, N, C) of the layers in ``reference_layers`` in
        ``recorded`` (the reference pass); the attention itself runs as usual.
    groups: cross-attention conditions; group 0 is the plain prompt, seen by every pixel outside
        a region. None = the UNet's own ``encoder_hidden_states``.
    regions: (B, G, h, w) one-hot partition of the latent over the groups, or None (all group 0).
    references: layer name -> (R, N_ref, C) recorded inputs; self-attention in those layers also
        attends to them, reference pixel weights (R, h_ref, w_ref) in ``reference_weights``
        (added to the logits as ``log weight``; 0 = never attended).
    capture_maps: keep, per layer, the head-mean attention probabilities of group 0 (B, N, L) in
        ``cross_maps`` and the image's own self-attention (B, N, N) in ``self_maps`` for layers
        with at most ``self_map_tokens`` pixels (how regions are located).
    capture_groups: keep every group's probabilities (B, H, N, L) with its pixel mask (B, N) in
        ``group_probs`` (tests).
    """

    record: bool = False
    reference_layers: tuple[str, ...] = ()
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: list[TextGroup] | None = None
    regions: torch.Tensor | None = None
    references: dict[str, torch.Tensor] | None = None
    reference_weights: torch.Tensor | None = None
    capture_maps: bool = False
    self_map_tokens: int = 1024
    cross_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    self_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    capture_groups: bool = False
    group_probs: list[tuple[str, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    # ------------------------------------------------------------------ dispatch
    def attend(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               value_states: torch.Tensor | None) -> torch.Tensor:
        """One SD 1.x attention layer; hidden_states (B, N, C) -> (B, N, C)."""
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("composition supports SD 1.x attention layers only")
        name = getattr(attn, "_studio_name", "")
        if encoder_hidden_states is None:
            out = self._self_attention(attn, name, hidden_states)
        else:
            out = self._cross_attention(attn, name, hidden_states, encoder_hidden_states, value_states)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _masks(self, batch: int, tokens: int) -> torch.Tensor | None:
        """(B, G, N) pixel masks of the groups at a layer with ``tokens`` pixels, or None."""
        if self.regions is None:
            return None
        regions = self.regions
        height, width = regions.shape[-2:]
        scale = max(1, round(math.sqrt(height * width / tokens)))
        small = F.interpolate(regions, size=(height // scale, width // scale), mode="nearest")
        if small.shape[-2] * small.shape[-1] != tokens:
            raise ValueError(f"cannot map a {height}x{width} region map onto a layer of {tokens} pixels")
        small = small.flatten(2)
        if small.shape[0] != batch:  # the unconditional half of classifier-free guidance shares the layout
            small = small.repeat(batch // small.shape[0], 1, 1)
        return small

    # ------------------------------------------------------------------ self-attention
    def _self_attention(self, attn, name: str, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden.shape
        heads = attn.heads
        query, key, value = _heads(attn.to_q(hidden), heads), _heads(attn.to_k(hidden), heads), _heads(attn.to_v(hidden), heads)
        if self.record and name in self.reference_layers:
            self.recorded[name] = hidden.detach()
        if self.capture_maps and tokens <= self.self_map_tokens:
            probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1, dtype=torch.float32)
            self.self_maps[name] = probs.mean(1)
        references = None if self.references is None else self.references.get(name)
        if references is None:
            return _merge(F.scaled_dot_product_attention(query, key, value), query.dtype)
        count, ref_tokens, _ = references.shape
        ref_key = _heads(attn.to_k(references).reshape(1, count * ref_tokens, -1), heads).expand(batch, -1, -1, -1)
        ref_value = _heads(attn.to_v(references).reshape(1, count * ref_tokens, -1), heads).expand(batch, -1, -1, -1)
        keys, values = torch.cat([key, ref_key], dim=2), torch.cat([value, ref_value], dim=2)
        side = int(round(math.sqrt(ref_tokens)))
        weights = F.interpolate(self.reference_weights[:, None].float(), size=(side, side), mode="area").flatten(1)
        log_weights = torch.log(weights.clamp_min(0)).reshape(-1)  # (R * N_ref,); log 0 = -inf: never attended
        groups = self.groups or [TextGroup(hidden=hidden)]
        masks = self._masks(batch, tokens)
        outputs = []
        for group in (groups if masks is not None else groups[:1]):
            allowed = range(count) if group.references is None else group.references
            if not allowed:
                outputs.append(F.scaled_dot_product_attention(query, key, value))
                continue
            keep = torch.zeros(count, ref_tokens, dtype=torch.bool, device=hidden.device)
            keep[list(allowed)] = True
            ref_bias = torch.where(keep.reshape(-1), log_weights, torch.full_like(log_weights, float("-inf")))
            bias = torch.cat([torch.zeros(tokens, device=hidden.device), ref_bias]).to(query.dtype)[None, None, None, :]
            outputs.append(F.scaled_dot_product_attention(query, keys, values, attn_mask=bias))
        return _merge(_combine(outputs, masks), query.dtype)

    # ------------------------------------------------------------------ cross-attention
    def _cross_attention(self, attn, name: str, hidden: torch.Tensor, text: torch.Tensor,
                         value_states: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, _ = hidden.shape
        heads = attn.heads
        query = _heads(attn.to_q(hidden), heads)
        groups = self.groups or [TextGroup(hidden=text, values=value_states)]
        masks = self._masks(batch, tokens)
        outputs = []
        for index, group in enumerate(groups if masks is not None else groups[:1]):
            states, values = group.hidden, group.hidden if group.values is None else group.values
            if attn.norm_cross:
                states, values = attn.norm_encoder_hidden_states(states), attn.norm_encoder_hidden_states(values)
            key, value = _heads(attn.to_k(states), heads), _heads(attn.to_v(values), heads)
            bias = None if group.key_bias is None else group.key_bias[:, None, None, :].to(query.dtype)
            want_probs = (self.capture_maps and index == 0) or self.capture_groups
            if not want_probs:
                outputs.append(F.scaled_dot_product_attention(query, key, value, attn_mask=bias))
                continue
            logits = query @ key.transpose(-1, -2) * attn.scale
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
            outputs.append(probs @ value)
            if self.capture_maps and index == 0:
                self.cross_maps[name] = probs.float().mean(1)
            if self.capture_groups:
                pixels = masks[:, index] if masks is not None else torch.ones(batch, tokens, device=hidden.device)
                self.group_probs.append((name, index, probs.float(), pixels))
        return _merge(_combine(outputs, masks), query.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def _merge(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim).to(dtype)


def _combine(outputs: list[torch.Tensor], masks: torch.Tensor | None) -> torch.Tensor:
    """Each pixel takes the output of its own group: outputs G x (B, H, N, d), masks (B, G, N) one-hot."""
    if masks is None:
        return outputs[0]
    combined = torch.zeros_like(outputs[0])
    for index, out in enumerate(outputs):
        combined = torch.where(masks[:, index, None, :, None] > 0, out, combined)
    return combined


@contextlib.contextmanager
def unet_context(control: UNetAttentionControl | None) -> Iterator[UNetAttentionControl | None]:
    """Within this block (this thread only), the UNet's attention follows ``control``."""
    token = _UNET_CONTROL.set(control)
    try:
        yield control
    finally:
        _UNET_CONTROL.reset(token)
