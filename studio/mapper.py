"""The identity mapper: diffusion timestep -> K identity-token embeddings (SPEC §3).

Only this module is trained. Its output tokens are residuals on the super-category word's
embedding, renormalised to that word's norm, so they stay on the scale of real words; the
output head starts at zero, so an untrained mapper says exactly the super-category word.
"""
from __future__ import annotations

import math

import torch
from torch import nn


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
    """

    def __init__(
        self,
        class_embedding: torch.Tensor,
        num_tokens: int = 4,
        band: tuple[int, int] = (400, 800),
        num_anchors: int = 200,
        hidden_dim: int = 128,
        time_encoding_dim: int = 2048,
        image_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        token_dim = class_embedding.shape[-1]
        self.num_tokens, self.token_dim, self.time_encoding_dim = num_tokens, token_dim, time_encoding_dim
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
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

        self.bypass: nn.Sequential | None = None
        if image_embed_dim:
            self.bypass = nn.Sequential(
                _mlp_block(time_encoding_dim + image_embed_dim, hidden_dim),
                _mlp_block(hidden_dim, hidden_dim),
                nn.Linear(hidden_dim, num_tokens * token_dim),
            )
            nn.init.zeros_(self.bypass[-1].weight)
            nn.init.zeros_(self.bypass[-1].bias)

    @property
    def has_bypass(self) -> bool:
        return self.bypass is not None

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, K, D) identity-token input embeddings."""
        features = timestep_encoding(timesteps.to(self.class_embedding.device), self.time_encoding_dim)
        residual = self.head(self.body(self.anchors(features))).view(-1, self.num_tokens, self.token_dim)
        norm = self.class_embedding.norm()
        return norm * nn.functional.normalize(residual + self.class_embedding, dim=-1)

    def bypass_vectors(self, timesteps: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps, (B, E) or (E,) image embedding -> (B, K, D) bypass residuals b_i."""
        if self.bypass is None:
            raise RuntimeError("this mapper has no image-bypass branch")
        features = timestep_encoding(timesteps.to(self.class_embedding.device), self.time_encoding_dim)
        image_embedding = image_embedding.to(features).expand(features.shape[0], -1)
        return self.bypass(torch.cat([features, image_embedding], dim=-1)).view(-1, self.num_tokens, self.token_dim)
