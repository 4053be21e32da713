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
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

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
    """diffusers' SDPA processor; cross-attention values may come from ``value_states``.

    value_states: (B, L, D) text states used for the values only (keys stay the plain states).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, value_states=None, **kwargs):
        if value_states is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.spatial_norm is not None or attn.group_norm is not None or attention_mask is not None:
            raise NotImplementedError("the image bypass supports SD 1.x cross-attention only")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            value_states = attn.norm_encoder_hidden_states(value_states)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(value_states)
        head_dim = key.shape[-1] // attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, H*d) -> (B, H, N, d)
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
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
