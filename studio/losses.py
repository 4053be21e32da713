"""Training losses (SPEC §4): masked reconstruction and Tandem Equilibrium."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ M·(ε − ε̂)² / Σ M over the whole batch, in fp32.

    Args:
        pred, target: (B, C, h, w) predicted and true noise (or velocity).
        mask: (B, 1, h, w) soft face mask in [0, 1], broadcast over channels.
    Returns:
        scalar loss; 0 (with gradient) when the mask is empty instead of a division by zero.
    """
    weights = mask.float().expand_as(pred)
    squared = (pred.float() - target.float()).pow(2)
    # An all-zero mask would divide 0 by 0; clamping keeps the result 0 and the graph intact.
    return (weights * squared).sum() / weights.sum().clamp_min(1e-8)


def prompt_lengths(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) token ids -> (B,) number of real tokens, BOS to the first EOS inclusive.

    CLIP's pad id equals its EOS id, so the first EOS marks the end of the prompt.
    """
    is_eos = input_ids == eos_token_id
    return is_eos.int().argmax(dim=1) + 1


@dataclass(frozen=True)
class TandemTerms:
    """Result of :class:`TandemEquilibriumLoss`.

    loss: scalar, mean over rows of (ā − β)².
    balance: (B,) ā per row: how often the identity token out-draws the strongest other word.
    subject, other: (B,) key positions s (identity) and o (strongest non-identity word).
    """

    loss: torch.Tensor
    balance: torch.Tensor
    subject: torch.Tensor
    other: torch.Tensor


class TandemEquilibriumLoss:
    """Keep the identity tokens from dominating the text encoder's self-attention (SPEC §4).

    Per prompt row: s = the identity token receiving the most attention (summed over heads and
    the queries below), o = the non-identity word receiving the most. Per head and query,
    p = softmax(τ·[A(q, s), A(q, o)])₀; ā = mean p; loss = (ā − β)². At β = ½ this is the
    paper's −ā(1 − ā) shifted by ¼.

    Choices:
      * Queries are the rows from the first identity token to EOS: the encoder is causal, so
        earlier rows cannot see the identity tokens at all (PITFALLS), and padding rows are
        not part of the prompt.
      * o never is the BOS token: CLIP dumps most attention onto BOS as a sink, so it would
        win nearly every time while carrying no meaning that a scene word could lose.
      * Padding keys (after EOS) are excluded; EOS itself is a candidate for o, as a real token
        of the prompt.
    """

    def __init__(self, balance_target: float = 0.5, temperature: float = 100.0) -> None:
        self.balance_target = balance_target
        self.temperature = temperature

    def __call__(self, attention: torch.Tensor, identity_mask: torch.Tensor, lengths: torch.Tensor) -> TandemTerms:
        """attention: (B, H, L, L) probabilities (queries × keys); identity_mask: (B, L) bool, at
        least one True per row (every TE prompt has its {}; not checked here, as that would
        stop the GPU every step); lengths: (B,) real tokens incl. BOS and EOS (see :func:`prompt_lengths`)."""
        attention = attention.float()
        batch, _, length, _ = attention.shape
        identity_mask = identity_mask.to(attention.device, torch.bool)
        positions = torch.arange(length, device=attention.device)
        real = positions[None, :] < lengths.to(attention.device)[:, None]  # (B, L)
        first_identity = identity_mask.int().argmax(dim=1)  # (B,) first True
        queries = real & (positions[None, :] >= first_identity[:, None])  # (B, L)

        with torch.no_grad():  # s and o are choices, not differentiated through
            received = torch.einsum("bhqk,bq->bk", attention, queries.float())  # (B, L)
            others = real & ~identity_mask & (positions[None, :] > 0)
            subject = received.masked_fill(~identity_mask, float("-inf")).argmax(dim=1)
            other = received.masked_fill(~others, float("-inf")).argmax(dim=1)

        rows = torch.arange(batch, device=attention.device)
        to_subject = attention[rows, :, :, subject]  # (B, H, L): every query's weight on s
        to_other = attention[rows, :, :, other]
        pair = self.temperature * torch.stack([to_subject, to_other], dim=-1)
        p = torch.softmax(pair, dim=-1)[..., 0]  # (B, H, L)
        weights = queries[:, None, :].float().expand_as(p)
        balance = (p * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))  # (B,)
        loss = (balance - self.balance_target).pow(2).mean()
        return TandemTerms(loss=loss, balance=balance, subject=subject, other=other)
