"""Identity slots in prompts, token injection, the balance gamma and attention capture."""
from __future__ import annotations

import threading

import pytest
import torch

from studio.conditioning import PromptError, check_prompt, encode_text, super_category_id, tokenize
from studio.mapper import IdentityMapper


@pytest.fixture(scope="module")
def slot(backbone):
    return super_category_id(backbone.tokenizer, "face")


def test_prompts_get_k_identity_slots_where_the_placeholder_was(backbone, slot):
    ids, mask = tokenize(backbone.tokenizer, ["a photo of {} as a chef"], 4, slot)
    assert ids.shape == mask.shape == (1, 77)
    positions = mask[0].nonzero().flatten().tolist()
    assert positions == [4, 5, 6, 7], "after <bos> a photo of"
    assert ids[0, 4:8].tolist() == [slot] * 4
    plain, plain_mask = tokenize(backbone.tokenizer, ["a photo of {} as a chef"], 0, slot)
    assert not plain_mask.any()
    assert plain[0, :6].tolist() == backbone.tokenizer("a photo of face as").input_ids[:6]


@pytest.mark.parametrize(
    ("prompt", "words"),
    [("", "empty"), ("   ", "empty"), ("a photo of a man", "{}"), ("{} and {}", "once")],
)
def test_bad_prompts_say_how_to_fix_them(prompt, words):
    with pytest.raises(PromptError, match=words):
        check_prompt(prompt)


def test_a_super_category_must_be_one_clip_token(backbone):
    assert super_category_id(backbone.tokenizer, "person") > 0
    with pytest.raises(PromptError, match="CLIP tokens"):
        super_category_id(backbone.tokenizer, "supercalifragilistic")


def test_too_long_prompts_are_refused(backbone, slot):
    with pytest.raises(PromptError, match="too long"):
        tokenize(backbone.tokenizer, ["{} " + "very " * 80], 4, slot)


def _mapper(backbone, slot, seed=0):
    word = backbone.text_encoder.get_input_embeddings().weight[slot].detach()
    mapper = IdentityMapper(word, 4, (200, 900), 16, 16, 64, None)
    with torch.no_grad():
        mapper.head.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return mapper


def test_an_untrained_zero_head_mapper_says_exactly_the_super_category_word(backbone, slot):
    word = backbone.text_encoder.get_input_embeddings().weight[slot].detach()
    mapper = IdentityMapper(word, 4, (400, 800), 16, 16, 64, None, head_init="zero")
    out = mapper(torch.tensor([400, 650, 800]))
    assert out.shape == (3, 4, word.shape[0])
    assert torch.allclose(out, word.expand_as(out), atol=1e-6)
    trained = _mapper(backbone, slot)(torch.tensor([500]))
    assert torch.allclose(trained.norm(dim=-1), word.norm().expand(1, 4), atol=1e-5), "renormalised to the word's norm"


def test_injection_changes_only_this_call_and_never_the_shared_table(backbone, slot):
    ids, mask = tokenize(backbone.tokenizer, ["a photo of {}"], 4, slot)
    table = backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    identity = _mapper(backbone, slot)(torch.tensor([500]))
    with torch.no_grad():
        injected = encode_text(backbone, ids, mask, identity).hidden
        plain = encode_text(backbone, ids).hidden
    assert not torch.allclose(injected, plain)
    assert torch.equal(plain[:, :4], injected[:, :4]), "causal: tokens before the slots are untouched"
    assert torch.equal(table, backbone.text_encoder.get_input_embeddings().weight)
    with torch.no_grad():
        assert torch.equal(encode_text(backbone, ids).hidden, plain), "nothing left behind"


def test_injection_is_private_to_each_thread(backbone, slot):
    ids, mask = tokenize(backbone.tokenizer, ["a photo of {}"], 4, slot)
    identity = _mapper(backbone, slot)(torch.tensor([500])).detach()
    with torch.no_grad():
        expected_plain = encode_text(backbone, ids).hidden
    results = {}
    barrier = threading.Barrier(2)

    def injected():
        barrier.wait()
        with torch.no_grad():
            results["injected"] = [encode_text(backbone, ids, mask, identity).hidden for _ in range(20)]

    def plain():
        barrier.wait()
        with torch.no_grad():
            results["plain"] = [encode_text(backbone, ids).hidden for _ in range(20)]

    threads = [threading.Thread(target=injected), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(h, expected_plain) for h in results["plain"])
    assert all(not torch.allclose(h, expected_plain) for h in results["injected"])


def test_balance_acts_on_identity_keys_and_attention_capture_keeps_gradients(backbone, slot):
    ids, mask = tokenize(backbone.tokenizer, ["{} is reading a book"], 4, slot)
    mapper = _mapper(backbone, slot)
    identity = mapper(torch.tensor([500]))
    neutral = encode_text(backbone, ids, mask, identity, capture_attention=True)
    favour_prompt = encode_text(backbone, ids, mask, identity, balance=0.25, capture_attention=True)
    attention, lowered = neutral.attention, favour_prompt.attention
    assert attention.shape == (1, 4, 77, 77)
    # share of attention that the words after the person give to the identity tokens
    queries = slice(5, 10)
    share = attention[0, :, queries][..., 1:5].sum(-1).mean()
    share_low = lowered[0, :, queries][..., 1:5].sum(-1).mean()
    assert share_low < share
    assert torch.allclose(attention.sum(-1)[0, :, :10], torch.ones(4, 10), atol=1e-5)
    assert torch.all(attention[0, :, 3, 4:] == 0), "causal: no query sees later keys"
    share.backward()
    assert mapper.head.weight.grad is not None and mapper.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.text_encoder.parameters())
