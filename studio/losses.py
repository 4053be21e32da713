"""Training losses (docs/ALGORITHM.md, "Losses"): masked reconstruction and Tandem Equilibrium."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ M·(ε − ε̂)² / Σ M per sample, then the mean over the batch, in fp32.

    Each photo weighs the same whatever the size of its face: a pooled Σ over the whole batch
    would let photos with larger masks dominate.

    Args:
        pred, target: (B, C, h, w) predicted and true noise (or velocity).
        mask: (B, 1, h, w) soft weights in [0, 1], broadcast over channels.
    Returns:
        scalar loss; a sample with an empty mask adds 0 (with gradient) instead of a division by zero.
    """
    weights = mask.float().expand_as(pred)
    squared = (pred.float() - target.float()).pow(2)
    per_sample = (weights * squared).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1e-8)  # (B,)
    # An all-zero mask would divide 0 by 0; clamping keeps that sample 0 and the graph intact.
    return per_sample.mean()


def prompt_lengths(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) token ids -> (B,) number of real tokens, BOS to the first EOS inclusive.

    CLIP's pad id equals its EOS id, so the first EOS marks the end of the prompt.
    """
    is_eos = input_ids == eos_token_id
    return is_eos.int().argmax(dim=1) + 1


@dataclass(frozen=True)
class TandemTerms:
    """Result of :class:`TandemEquilibriumLoss`.

    loss: scalar, mean over prompts of (ā − β)².
    balance: (B,) ā per prompt: how often the identity token out-draws the strongest other word,
        over the query rows that can see both.
    subject, other: (B,) key positions s (identity) and o (strongest non-identity word).
    """

    loss: torch.Tensor
    balance: torch.Tensor
    subject: torch.Tensor
    other: torch.Tensor


class TandemEquilibriumLoss:
    """Keep the identity tokens from dominating the text encoder's self-attention (docs/ALGORITHM.md).

    Per prompt row: s = the identity token receiving the most attention (summed over heads and
    the queries below), o = the non-identity word receiving the most. Per head and query,
    p = softmax(τ·[A(q, s), A(q, o)])₀; ā = mean p; loss = (ā − β)². At β = ½ this is the
    paper's −ā(1 − ā) shifted by ¼.

    Choices:
      * s and o are chosen by the attention they receive from the rows at or after the first
        identity token (earlier rows cannot see the identity tokens: the encoder is causal).
      * o never is BOS (CLIP dumps most attention onto BOS as a sink, so it would win nearly
        every time while carrying no meaning a scene word could lose), never EOS and never a
        padding token: it is a word of the prompt.
      * ā averages only the query rows that can attend to both s and o (causal: q >= max(s, o),
        up to and including EOS). A row that sees only s gives p >= ½ whatever the balance and
        would bias ā upwards (docs/ALGORITHM.md, "Tandem Equilibrium"). The trainer reports
        this ā as the "identity attention share", so the number shown and the loss agree.
      * A prompt without any other word (no candidate for o) gives ā = β and no loss.
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
        seeing_identity = real & (positions[None, :] >= first_identity[:, None])  # (B, L)

        with torch.no_grad():  # s and o are choices, not differentiated through
            received = torch.einsum("bhqk,bq->bk", attention, seeing_identity.float())  # (B, L)
            last_word = lengths.to(attention.device)[:, None] - 1  # EOS position
            others = real & ~identity_mask & (positions[None, :] > 0) & (positions[None, :] < last_word)
            subject = received.masked_fill(~identity_mask, float("-inf")).argmax(dim=1)
            other = received.masked_fill(~others, float("-inf")).argmax(dim=1)
            has_other = others.any(dim=1)  # (B,)
            # Rows that can see both s and o (causal), within the prompt.
            queries = real & (positions[None, :] >= torch.maximum(subject, other)[:, None]) & has_other[:, None]

        rows = torch.arange(batch, device=attention.device)
        to_subject = attention[rows, :, :, subject]  # (B, H, L): every query's weight on s
        to_other = attention[rows, :, :, other]
        pair = self.temperature * torch.stack([to_subject, to_other], dim=-1)
        p = torch.softmax(pair, dim=-1)[..., 0]  # (B, H, L)
        weights = queries[:, None, :].float().expand_as(p)
        counted = weights.sum(dim=(1, 2))
        balance = (p * weights).sum(dim=(1, 2)) / counted.clamp_min(1.0)  # (B,)
        balance = torch.where(has_other, balance, torch.full_like(balance, self.balance_target))
        loss = (balance - self.balance_target).pow(2).mean()
        return TandemTerms(loss=loss, balance=balance, subject=subject, other=other)
