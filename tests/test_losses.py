"""Masked reconstruction and Tandem Equilibrium losses (docs/ALGORITHM.md, "Losses")."""
from __future__ import annotations

import math

import pytest
import torch

from studio.losses import TandemEquilibriumLoss, masked_mse, prompt_lengths

# --------------------------------------------------------------------------- masked MSE


def test_masked_mse_counts_only_masked_pixels():
    target = torch.zeros(1, 2, 2, 2)
    pred = torch.zeros(1, 2, 2, 2)
    pred[..., 0, 0] = 3.0  # error inside the mask
    pred[..., 1, 1] = 100.0  # error outside the mask must not count
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1.0
    mask[..., 0, 1] = 1.0
    # Two masked pixels x two channels; the squared error 9 sits in two of those four cells.
    assert masked_mse(pred, target, mask).item() == pytest.approx(9 * 2 / 4)


def test_masked_mse_weights_soft_masks_within_a_sample():
    pred = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 2)
    target = torch.zeros(1, 1, 1, 2)
    mask = torch.tensor([0.25, 1.0]).view(1, 1, 1, 2)
    expected = (0.25 * 1.0 + 1.0 * 4.0) / (0.25 + 1.0)
    assert masked_mse(pred, target, mask).item() == pytest.approx(expected)


def test_masked_mse_normalises_per_sample_then_averages_the_batch():
    # Photo 0 has a small face (one masked cell, error 1), photo 1 a large one (four cells,
    # error 4 each): each photo weighs the same, so the loss is (1 + 4) / 2, not the pooled
    # (1 + 16) / 5 that lets the larger face dominate.
    pred = torch.zeros(2, 1, 2, 2)
    pred[0, 0, 0, 0] = 1.0
    pred[1] = 2.0
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0
    mask[1] = 1.0
    assert masked_mse(pred, torch.zeros_like(pred), mask).item() == pytest.approx(2.5)


def test_masked_mse_sample_with_an_empty_mask_adds_zero():
    pred = torch.ones(2, 1, 2, 2)
    mask = torch.zeros(2, 1, 2, 2)
    mask[1] = 1.0
    assert masked_mse(pred, torch.zeros_like(pred), mask).item() == pytest.approx(0.5)


def test_masked_mse_with_empty_mask_is_zero_and_finite():
    pred = torch.randn(1, 4, 3, 3, requires_grad=True)
    loss = masked_mse(pred, torch.zeros(1, 4, 3, 3), torch.zeros(1, 1, 3, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()


# --------------------------------------------------------------------------- tandem equilibrium
BOS, W1, ID_A, ID_B, W2, W3, EOS, PAD = range(8)


def hand_built_attention() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt [BOS w1 id id w2 w3 EOS PAD], 2 heads, with traps for a wrong s / o choice.

    * BOS receives the most attention of all (a sink): must not be o.
    * PAD receives a lot from the real queries: must not be o (not part of the prompt).
    * w1 receives almost everything from query w1, which cannot see the identity tokens
      (causal): counted over all queries it would win; over queries >= first identity, w3 wins.
    * s = id_b and o = w3, so ā averages the rows w3 and EOS (the rows that see both).
    """
    heads, length = 2, 8
    attention = torch.full((1, heads, length, length), 0.01)
    attention[..., :, BOS] = 0.5
    attention[..., ID_A:EOS + 1, PAD] = 0.45
    attention[..., W1, W1] = 0.99
    attention[..., ID_A:EOS + 1, W3] = 0.10
    attention[..., ID_A:EOS + 1, ID_A] = 0.05
    attention[..., ID_A:EOS + 1, ID_B] = 0.08
    # Make heads and queries differ so the mean is not trivial.
    attention[0, 1, W2, ID_B] = 0.12
    attention[0, 0, EOS, W3] = 0.13
    identity_mask = torch.zeros(1, length, dtype=torch.bool)
    identity_mask[0, [ID_A, ID_B]] = True
    lengths = torch.tensor([EOS + 1])
    return attention, identity_mask, lengths


def balance_by_hand(attention: torch.Tensor, subject: int, other: int, queries: range, tau: float) -> float:
    values = []
    for head in range(attention.shape[1]):
        for query in queries:
            a_s, a_o = attention[0, head, query, subject].item(), attention[0, head, query, other].item()
            values.append(math.exp(tau * a_s) / (math.exp(tau * a_s) + math.exp(tau * a_o)))
    return sum(values) / len(values)


def test_tandem_picks_subject_and_other_excluding_bos_padding_and_blind_queries():
    attention, identity_mask, lengths = hand_built_attention()
    terms = TandemEquilibriumLoss()(attention, identity_mask, lengths)
    assert terms.subject.tolist() == [ID_B]
    assert terms.other.tolist() == [W3]


@pytest.mark.parametrize("tau", [100.0, 10.0])
def test_tandem_loss_at_half_is_the_papers_objective_plus_a_quarter(tau):
    attention, identity_mask, lengths = hand_built_attention()
    expected_balance = balance_by_hand(attention, ID_B, W3, range(W3, EOS + 1), tau)
    assert 0.05 < expected_balance < 0.95  # a non-trivial example
    terms = TandemEquilibriumLoss(balance_target=0.5, temperature=tau)(attention, identity_mask, lengths)
    assert terms.balance.item() == pytest.approx(expected_balance, rel=1e-5)
    paper = -expected_balance * (1 - expected_balance) + 0.25
    assert terms.loss.item() == pytest.approx(paper, rel=1e-5)


def test_tandem_loss_uses_the_balance_target():
    attention, identity_mask, lengths = hand_built_attention()
    a = balance_by_hand(attention, ID_B, W3, range(W3, EOS + 1), 100.0)
    terms = TandemEquilibriumLoss(balance_target=0.2)(attention, identity_mask, lengths)
    assert terms.loss.item() == pytest.approx((a - 0.2) ** 2, rel=1e-5)


def test_tandem_batch_rows_are_independent_and_averaged():
    attention, identity_mask, lengths = hand_built_attention()
    # Row 2: a shorter prompt [BOS id id w EOS PAD...]: o can only be w (never EOS).
    second = torch.rand(1, 2, 8, 8)
    mask2 = torch.zeros(1, 8, dtype=torch.bool)
    mask2[0, 1:3] = True
    batch = TandemEquilibriumLoss()(
        torch.cat([attention, second]), torch.cat([identity_mask, mask2]), torch.cat([lengths, torch.tensor([5])])
    )
    assert batch.other.tolist() == [W3, 3]
    b2 = balance_by_hand(second, int(batch.subject[1]), 3, range(3, 5), 100.0)
    b1 = balance_by_hand(attention, ID_B, W3, range(W3, EOS + 1), 100.0)
    assert batch.balance.tolist() == pytest.approx([b1, b2], rel=1e-5)
    assert batch.loss.item() == pytest.approx(((b1 - 0.5) ** 2 + (b2 - 0.5) ** 2) / 2, rel=1e-5)


def causal_attention(length: int, real: int, favourite: dict[int, int]) -> torch.Tensor:
    """(1, 1, length, length) causal probabilities: each query q < real spreads over keys <= q,
    with 80 % on ``favourite[q]`` where given."""
    attention = torch.zeros(1, 1, length, length)
    for q in range(length):
        keys = range(min(q, real - 1) + 1)
        for k in keys:
            attention[0, 0, q, k] = 1.0 / len(keys)
        if q in favourite:
            attention[0, 0, q] *= 0.2
            attention[0, 0, q, favourite[q]] += 0.8
    return attention


def test_tandem_averages_only_rows_that_see_both_s_and_o():
    # [BOS id id w1 w2 EOS]: rows id, id and w1 cannot see w2 (causal). They give p >= ½
    # whatever the balance; averaging them in (rows from the first identity token) biases ā up.
    attention = causal_attention(8, 6, favourite={3: 1, 4: 4, 5: 4})
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1:3] = True
    terms = TandemEquilibriumLoss(temperature=10.0)(attention, mask, torch.tensor([6]))
    s, o = int(terms.subject), int(terms.other)
    assert (s, o) == (1, 4)
    both = balance_by_hand(attention, s, o, range(4, 6), 10.0)
    from_first_identity = balance_by_hand(attention, s, o, range(1, 6), 10.0)
    assert terms.balance.item() == pytest.approx(both, rel=1e-5)
    assert from_first_identity > both + 0.1  # the old rows really are biased upwards


def test_tandem_never_picks_eos_as_the_other_word():
    # EOS attends mostly to itself, so it receives the most attention of all non-identity keys.
    attention = causal_attention(8, 6, favourite={5: 5})
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1:3] = True
    terms = TandemEquilibriumLoss()(attention, mask, torch.tensor([6]))
    assert int(terms.other) in (3, 4)


def test_tandem_prompt_without_another_word_gives_no_loss():
    attention = causal_attention(8, 4, favourite={})  # [BOS id id EOS]
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1:3] = True
    terms = TandemEquilibriumLoss(balance_target=0.3)(attention, mask, torch.tensor([4]))
    assert terms.balance.item() == pytest.approx(0.3) and terms.loss.item() == 0.0


def test_tandem_gradient_touches_only_s_and_o_at_the_used_queries():
    attention, identity_mask, lengths = hand_built_attention()
    attention.requires_grad_(True)
    TandemEquilibriumLoss(temperature=10.0)(attention, identity_mask, lengths).loss.backward()
    grad = attention.grad.abs().sum(dim=1)[0]  # (queries, keys)
    used = grad > 0
    assert used[W3:EOS + 1, ID_B].all() and used[W3:EOS + 1, W3].all()
    assert used.sum() == 2 * (EOS + 1 - W3)


def test_prompt_lengths_end_at_the_first_eos(backbone):
    from studio.conditioning import super_category_id, tokenize

    tokenizer = backbone.tokenizer
    ids, _ = tokenize(tokenizer, ["a photo of {}", "{} is reading a book"], 4, super_category_id(tokenizer, "face"))
    # [BOS a photo of id*4 EOS] and [BOS id*4 is reading a book EOS]
    assert prompt_lengths(ids, tokenizer.eos_token_id).tolist() == [9, 10]


def test_tandem_gradients_from_the_text_encoder_reach_only_the_mapper(backbone):
    from studio.conditioning import encode_text, super_category_id, tokenize
    from studio.mapper import IdentityMapper

    tokenizer = backbone.tokenizer
    slot = super_category_id(tokenizer, "face")
    mapper = IdentityMapper(
        backbone.text_encoder.get_input_embeddings().weight[slot], num_tokens=4, num_anchors=8, hidden_dim=16,
        time_encoding_dim=32,
    )
    # A non-zero head, so the gradient also reaches the layers below it.
    torch.nn.init.normal_(mapper.head.weight, std=0.02)
    ids, mask = tokenize(tokenizer, ["{} is reading a book", "{} on the beach"], 4, slot)
    states = encode_text(backbone, ids, mask, identity=mapper(torch.tensor([500, 700])), capture_attention=True)
    terms = TandemEquilibriumLoss(temperature=10.0)(states.attention, mask, prompt_lengths(ids, tokenizer.eos_token_id))
    terms.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.parameters())
    frozen = [backbone.text_encoder, backbone.unet, backbone.vae]
    assert all(p.grad is None for module in frozen for p in module.parameters())
