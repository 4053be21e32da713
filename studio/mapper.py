"""The identity mapper: diffusion timestep -> K identity-token embeddings (docs/ALGORITHM.md, "Mapper").

Only this module is trained. Its output tokens are residuals on the super-category word's
embedding, renormalised to that word's norm, so they stay on the scale of real words. The
output heads start with torch's default layer initialisation (the released recipe: tokens
start in random directions around the word) or at zero (``head_init="zero"``: an untrained
mapper says exactly the super-category word).

:class:`StaticTokenMapper` is the plain textual-inversion baseline with the same interface:
one learned vector per token, the same for every timestep, so the trainer, sampler and concept
files treat both alike. :func:`build_mapper` makes either from the settings a concept records.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Which input the image-bypass branch reads.
#   "trunk": [the trunk's hidden output ; image embedding] (released: its gradient also trains the trunk)
#   "encoding": [the raw sinusoidal timestep encoding ; image embedding] (a separate branch)
BYPASS_INPUTS = ("trunk", "encoding")
HEAD_INITS = ("default", "zero")
METHODS = ("personamagic", "ti")


def timestep_encoding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM-style sinusoidal features: (B,) timesteps -> (B, dim) as [sin | cos]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _mlp_block(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.LeakyReLU())


class IdentityMapper(nn.Module):
    """MLP(t) -> K token embeddings, plus the optional image-bypass branch.

    Args:
        class_embedding: (D,) input embedding of the super-category word.
        num_tokens: K identity tokens.
        band: (lo, hi) training band; anchors are spread evenly over it.
        image_embed_dim: width of the reference image embedding, or None for no bypass.
        bypass_input: what the bypass reads besides the image embedding, see :data:`BYPASS_INPUTS`.
        head_init: "default" (torch's layer init) or "zero" for the token head and the bypass head.
    """

    method = "personamagic"

    def __init__(
        self,
        class_embedding: torch.Tensor,
        num_tokens: int = 4,
        band: tuple[int, int] = (400, 800),
        num_anchors: int = 200,
        hidden_dim: int = 128,
        time_encoding_dim: int = 2048,
        image_embed_dim: int | None = None,
        bypass_input: str = "trunk",
        head_init: str = "default",
    ) -> None:
        super().__init__()
        if bypass_input not in BYPASS_INPUTS:
            raise ValueError(f"bypass_input must be one of {', '.join(BYPASS_INPUTS)}, got {bypass_input!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        token_dim = class_embedding.shape[-1]
        self.num_tokens, self.token_dim, self.time_encoding_dim = num_tokens, token_dim, time_encoding_dim
        self.num_anchors, self.hidden_dim = num_anchors, hidden_dim
        self.image_embed_dim = image_embed_dim or None
        self.bypass_input = bypass_input
        self.register_buffer("class_embedding", class_embedding.detach().float().clone())

        # Anchor layer: row j starts as the encoding of anchor time a_j, so the first layer
        # reads out similarity-to-anchors; the rows are then trained freely.
        self.anchors = nn.Linear(time_encoding_dim, num_anchors)
        anchor_times = torch.linspace(band[0], band[1], num_anchors)
        with torch.no_grad():
            self.anchors.weight.copy_(timestep_encoding(anchor_times, time_encoding_dim))
            self.anchors.bias.zero_()
        self.body = nn.Sequential(_mlp_block(num_anchors, hidden_dim), _mlp_block(hidden_dim, hidden_dim))
        self.head = nn.Linear(hidden_dim, num_tokens * token_dim)

        self.bypass: nn.Sequential | None = None
        if self.image_embed_dim:
            first = hidden_dim if bypass_input == "trunk" else time_encoding_dim
            self.bypass = nn.Sequential(
                _mlp_block(first + self.image_embed_dim, hidden_dim),
                _mlp_block(hidden_dim, hidden_dim),
                nn.Linear(hidden_dim, num_tokens * token_dim),
            )
        if head_init == "zero":
            for layer in (self.head, None if self.bypass is None else self.bypass[-1]):
                if layer is not None:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    @property
    def has_bypass(self) -> bool:
        return self.bypass is not None

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this mapper (weights come from the tensors)."""
        return {
            "method": self.method,
            "num_tokens": self.num_tokens,
            "num_anchors": self.num_anchors,
            "hidden_dim": self.hidden_dim,
            "time_encoding_dim": self.time_encoding_dim,
            "image_embed_dim": self.image_embed_dim,
            "bypass_input": self.bypass_input,
        }

    def _trunk(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, hidden_dim) trunk output."""
        features = timestep_encoding(timesteps.to(self.class_embedding.device), self.time_encoding_dim)
        return self.body(self.anchors(features))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, K, D) identity-token input embeddings."""
        residual = self.head(self._trunk(timesteps)).view(-1, self.num_tokens, self.token_dim)
        norm = self.class_embedding.norm()
        return norm * nn.functional.normalize(residual + self.class_embedding, dim=-1)

    def bypass_vectors(self, timesteps: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps, (B, E) or (E,) image embedding -> (B, K, D) bypass residuals b_i."""
        if self.bypass is None:
            raise RuntimeError("this mapper has no image-bypass branch")
        if self.bypass_input == "trunk":
            features = self._trunk(timesteps)
        else:
            features = timestep_encoding(timesteps.to(self.class_embedding.device), self.time_encoding_dim)
        image_embedding = image_embedding.to(features).expand(features.shape[0], -1)
        return self.bypass(torch.cat([features, image_embedding], dim=-1)).view(-1, self.num_tokens, self.token_dim)


class StaticTokenMapper(nn.Module):
    """Plain textual inversion: K learned token vectors, the same for every timestep.

    Each vector starts as the super-category word's embedding and is trained freely (no
    renormalisation, no MLP, no bypass). Same interface as :class:`IdentityMapper`.

    Args:
        class_embedding: (D,) input embedding of the super-category word.
        num_tokens: K tokens (the baseline uses one).
    """

    method = "ti"
    bypass = None
    image_embed_dim = None

    def __init__(self, class_embedding: torch.Tensor, num_tokens: int = 1) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, class_embedding.shape[-1]
        self.register_buffer("class_embedding", class_embedding.detach().float().clone())
        self.tokens = nn.Parameter(self.class_embedding.expand(num_tokens, -1).clone())

    @property
    def has_bypass(self) -> bool:
        return False

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this mapper (weights come from the tensors)."""
        return {"method": self.method, "num_tokens": self.num_tokens, "image_embed_dim": None}

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps (ignored) -> (B, K, D): the same learned vectors for every row."""
        return self.tokens[None].expand(timesteps.shape[0], -1, -1)

    def bypass_vectors(self, timesteps: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a textual-inversion concept has no image-bypass branch")


Mapper = IdentityMapper | StaticTokenMapper


def build_mapper(
    class_embedding: torch.Tensor, method: str = "personamagic", band: tuple[int, int] = (400, 800), **settings: Any
) -> Mapper:
    """A mapper of ``method`` ("personamagic" or "ti") from the settings :meth:`IdentityMapper.settings`
    records; settings the method does not use are ignored."""
    if method == "ti":
        return StaticTokenMapper(class_embedding, num_tokens=int(settings.get("num_tokens", 1)))
    if method != "personamagic":
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    known = ("num_tokens", "num_anchors", "hidden_dim", "time_encoding_dim", "image_embed_dim", "bypass_input", "head_init")
    return IdentityMapper(class_embedding, band=band, **{k: v for k, v in settings.items() if k in known})
