"""The classic attentions: masking, normalisation, shapes and the scoring formulas."""

import pytest
import torch

from nmt.config import COMPONENT_SCHEMAS, build
from nmt.errors import NmtError
from nmt.models import zoo
from nmt.models.attention import masked_softmax

CLASSIC = ["bahdanau", "luong_dot", "luong_general", "luong_concat"]
B, T, S, SIZE = 3, 4, 6, 8
LENGTHS = torch.tensor([6, 3, 1])


def make_attention(name: str, query_size: int = SIZE, memory_size: int = SIZE, **options):
    return zoo.build_attention(build(COMPONENT_SCHEMAS["attention"][name], options), query_size, memory_size)


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, T, SIZE, generator=gen)
    memory = torch.randn(B, S, SIZE, generator=gen)
    mask = torch.arange(S).unsqueeze(0) < LENGTHS.unsqueeze(1)
    return query, memory, mask


def run(attention, query, memory, mask):
    return attention(query, attention.precompute(memory), memory, mask)


@pytest.mark.parametrize("name", CLASSIC)
def test_padding_gets_zero_weight_and_rows_sum_to_one(name):
    torch.manual_seed(0)
    query, memory, mask = inputs()
    context, weights = run(make_attention(name), query, memory, mask)
    assert context.shape == (B, T, SIZE) and weights.shape == (B, T, S)
    padded = ~mask.unsqueeze(1).expand(B, T, S)
    assert torch.all(weights[padded] == 0)
    assert torch.all(weights[~padded] > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T))
    torch.testing.assert_close(context, weights @ memory)


@pytest.mark.parametrize("name", CLASSIC)
def test_padded_memory_content_never_reaches_the_context(name):
    torch.manual_seed(0)
    attention = make_attention(name)
    query, memory, mask = inputs()
    garbage = memory.masked_fill(~mask.unsqueeze(-1), 1e4)
    expected, _ = run(attention, query, memory, mask)
    context, _ = run(attention, query, garbage, mask)
    torch.testing.assert_close(context, expected)


@pytest.mark.parametrize("name", CLASSIC)
def test_many_queries_at_once_equal_one_at_a_time(name):
    torch.manual_seed(0)
    attention = make_attention(name)
    query, memory, mask = inputs()
    context, weights = run(attention, query, memory, mask)
    for t in range(T):
        c_t, w_t = run(attention, query[:, t:t + 1], memory, mask)
        torch.testing.assert_close(c_t, context[:, t:t + 1])
        torch.testing.assert_close(w_t, weights[:, t:t + 1])


def _reference_scores(name, attention, query, memory):
    """The paper formulas, written out per (t, i) pair."""
    if name == "luong_dot":
        return torch.einsum("btq,bsq->bts", query, memory)
    if name == "luong_general":
        return torch.einsum("btq,qh,bsh->bts", query, attention.W.weight, memory)
    w_s, w_h, v = attention.W.weight, attention.U.weight, attention.v.weight.squeeze(0)
    scores = torch.empty(B, T, S)
    for b in range(B):
        for t in range(T):
            for i in range(S):
                scores[b, t, i] = v @ torch.tanh(w_s @ query[b, t] + w_h @ memory[b, i])
    return scores


@pytest.mark.parametrize("name", CLASSIC)
def test_weights_follow_the_scoring_formula(name):
    torch.manual_seed(0)
    attention = make_attention(name)
    query, memory, mask = inputs()
    _, weights = run(attention, query, memory, mask)
    scores = _reference_scores(name, attention, query, memory)
    expected = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
    torch.testing.assert_close(weights, expected)


def test_luong_concat_is_w_times_the_concatenation():
    torch.manual_seed(0)
    attention = make_attention("luong_concat", query_size=5, memory_size=7, hidden_size=3)
    s, h = torch.randn(5), torch.randn(7)
    w = torch.cat([attention.W.weight, attention.U.weight], dim=1)  # W = [W_s W_h], [3, 12]
    expected = attention.v.weight.squeeze(0) @ torch.tanh(w @ torch.cat([s, h]))
    got = attention.score(s.view(1, 1, 5), attention.precompute(h.view(1, 1, 7)))
    torch.testing.assert_close(got.view(()), expected)


@pytest.mark.parametrize("name", ["bahdanau", "luong_concat"])
def test_additive_hidden_size_defaults_to_query_size(name):
    assert make_attention(name, query_size=5, memory_size=7).W.out_features == 5
    assert make_attention(name, query_size=5, memory_size=7, hidden_size=11).W.out_features == 11


@pytest.mark.parametrize("name", ["bahdanau", "luong_general", "luong_concat"])
def test_query_and_memory_sizes_may_differ(name):
    attention = make_attention(name, query_size=5, memory_size=7)
    memory = torch.randn(2, 4, 7)
    context, weights = attention(torch.randn(2, 3, 5), attention.precompute(memory), memory,
                                 torch.ones(2, 4, dtype=torch.bool))
    assert context.shape == (2, 3, 7) and weights.shape == (2, 3, 4)


def test_luong_dot_rejects_mismatched_sizes():
    with pytest.raises(NmtError, match=r"model\.attention\.type: luong_dot .*\(5\).*\(7\)"):
        make_attention("luong_dot", query_size=5, memory_size=7)


def test_none_builds_no_module():
    assert make_attention("none") is None


def test_masked_softmax_of_an_all_padding_row_is_zero_not_nan():
    scores = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    weights = masked_softmax(scores, mask)
    assert torch.all(weights[1] == 0)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(3))


def test_masked_softmax_is_computed_in_fp32_from_half_precision_scores():
    scores = torch.tensor([[[0.0, 20.0, -20.0]]], dtype=torch.bfloat16)
    weights = masked_softmax(scores, torch.ones(1, 3, dtype=torch.bool))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.softmax(scores.float(), dim=-1))


@pytest.mark.parametrize("use_v", [True, False])
def test_split_kv_gives_views_and_the_gradient_of_unbind(use_v):
    """MultiHeadAttention.split_kv: K and V as views of the projection; its backward (one buffer written in
    place) equals autograd's through view/permute/unbind, an unused V included."""
    from nmt.models.multihead import MultiHeadAttention

    attention = MultiHeadAttention(16, 16, 16, heads=4)
    kv = torch.randn(3, 5, 32, requires_grad=True)
    reference = kv.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(0)
    grad_k, grad_v = torch.randn(3, 4, 5, 4, generator=gen), torch.randn(3, 4, 5, 4, generator=gen)
    k, v = attention.split_kv(kv)
    ref_k, ref_v = reference.view(3, 5, 2, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v) and k.data_ptr() == kv.data_ptr()
    ((k * grad_k).sum() + (v * grad_v).sum() * use_v).backward()
    ((ref_k * grad_k).sum() + (ref_v * grad_v).sum() * use_v).backward()
    assert torch.equal(kv.grad, reference.grad)
