"""The Transformer encoder/decoder and multi-head attention: masking, incremental decoding, hybrids."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from nmt.config import build, from_dict, load_config
from nmt.errors import NmtError
from nmt.models import zoo
from nmt.models.interfaces import EncoderOutput
from nmt.models.multihead import MultiHead, MultiHeadOptions, attend
from nmt.models.transformer import (
    Residual,
    TransformerDecoder,
    TransformerDecoderOptions,
    TransformerEncoder,
    TransformerEncoderOptions,
    sinusoidal_table,
)
from nmt.vocab import PAD_ID

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
needs_rnn = pytest.mark.skipif(importlib.util.find_spec("nmt.models.rnn") is None,
                               reason="nmt.models.rnn is not there yet")
SMALL = {"layers": 2, "d_model": 16, "heads": 4, "ff_size": 32}


def encoder(input_size: int = 16, **options) -> TransformerEncoder:
    opts = build(TransformerEncoderOptions, {**SMALL, **options}, "model.encoder")
    return TransformerEncoder(opts, input_size).eval()


def decoder(input_size: int = 16, memory_size: int = 16, attention: str = "none",
            **options) -> TransformerDecoder:
    opts = build(TransformerDecoderOptions, {**SMALL, **options}, "model.decoder")
    attention_options = from_dict({"model": {"attention": {"type": attention}}}).model.attention
    return TransformerDecoder(opts, input_size, memory_size, attention_options).eval()


def lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def memory_with_padding(batch_lengths: list[int], size: int = 16) -> EncoderOutput:
    total = max(batch_lengths) + 1  # always at least one padded column
    mask = lengths_mask(batch_lengths, total)
    memory = torch.randn(len(batch_lengths), total, size)
    return EncoderOutput(memory, mask, memory.mean(1))


def step_by_step(dec: TransformerDecoder, tgt: torch.Tensor, enc: EncoderOutput, state: dict,
                 steps: range) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    outputs, weights = [], []
    for t in steps:
        out, state, attn = dec(tgt[:, t:t + 1], enc, state)
        outputs.append(out)
        weights.append(attn)
    return outputs, weights, state


# ----------------------------------------------------------------------------------------------
# attention core


@pytest.mark.parametrize("causal,with_mask,queries", [(False, True, 5), (True, False, 7), (True, True, 7),
                                                     (True, True, 3), (False, False, 1)])
def test_sdpa_and_explicit_paths_agree(causal, with_mask, queries):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, queries, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = lengths_mask([7, 4, 1], 7) if with_mask else None
    explicit, _ = attend(q, k, v, mask, causal, use_sdpa=False)
    fused, none = attend(q, k, v, mask, causal, use_sdpa=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


def test_attention_formula_and_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8)
    mask = lengths_mask([4, 2], 4)
    context, weights = attend(q, k, v, mask, causal=True, need_weights=True)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril() & mask[:, None, None, :]
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(context, expected @ v)
    assert torch.all(weights[1, :, :, 2:] == 0)  # padded keys: exactly zero
    assert torch.all(weights[0].triu(1) == 0)  # future keys: exactly zero


def test_causal_mask_with_cached_prefix_lets_new_queries_see_the_cache():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    _, weights = attend(q, k, v, causal=True, need_weights=True)  # queries are positions 3 and 4
    assert torch.all(weights[0, 0, 0, :4] > 0) and weights[0, 0, 0, 4] == 0
    assert torch.all(weights[0, 0, 1] > 0)


def test_multihead_attention_interface():
    torch.manual_seed(0)
    opts = build(MultiHeadOptions, {"heads": 2}, "model.attention")
    attention = zoo.build_attention(opts, 12, 10)
    assert isinstance(attention, MultiHead)
    memory, mask = torch.randn(3, 6, 10), lengths_mask([6, 3, 1], 6)
    keys = attention.precompute(memory)
    assert keys.shape == (3, 6, 2 * 12)
    context, weights = attention(torch.randn(3, 4, 12), keys, memory, mask)
    assert context.shape == (3, 4, 10) and weights.shape == (3, 4, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    assert torch.all(weights[1, :, 3:] == 0) and torch.all(weights[2, :, 1:] == 0)


def test_multihead_sizes_must_divide_into_heads():
    opts = build(MultiHeadOptions, {"heads": 3}, "model.attention")
    with pytest.raises(NmtError, match="model.attention.hidden_size .*not divisible by heads 3"):
        MultiHead(opts, 16, 16)
    with pytest.raises(NmtError, match="model.encoder.d_model: size 16 is not divisible by heads 3"):
        encoder(heads=3)


# ----------------------------------------------------------------------------------------------
# encoder


def test_sinusoidal_table_formula():
    table = sinusoidal_table(50, 8)
    p = torch.arange(50.0)
    torch.testing.assert_close(table[:, 0], torch.sin(p))
    torch.testing.assert_close(table[:, 1], torch.cos(p))
    torch.testing.assert_close(table[:, 6], torch.sin(p / 10000 ** (6 / 8)))
    torch.testing.assert_close(table[:, 7], torch.cos(p / 10000 ** (6 / 8)))


@pytest.mark.parametrize("norm,positions", [("pre", "sinusoidal"), ("post", "learned")])
def test_encoder_ignores_padding(norm, positions):
    torch.manual_seed(0)
    enc = encoder(input_size=12, norm=norm, positions=positions)  # 12 != d_model: input projection
    x = torch.randn(2, 9, 12)
    mask = lengths_mask([9, 5], 9)
    out = enc(x, mask)
    assert out.memory.shape == (2, 9, 16) and enc.output_size == 16
    alone = enc(x[1:, :5], mask[1:, :5])  # the short sentence without its padding
    torch.testing.assert_close(out.memory[1, :5], alone.memory[0], atol=1e-5, rtol=0)
    garbage = x.clone()
    garbage[1, 5:] = 100.0  # whatever sits in the padded slots must not matter
    torch.testing.assert_close(enc(garbage, mask).memory[1, :5], out.memory[1, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.final[1], out.memory[1, :5].mean(0), atol=1e-5, rtol=0)


def test_final_layernorm_only_for_pre_norm():
    assert isinstance(encoder(norm="pre").final_norm, torch.nn.LayerNorm)
    assert not isinstance(encoder(norm="post").final_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_encoder_outputs_are_layer_normalised(norm):
    torch.manual_seed(0)
    memory = encoder(norm=norm)(torch.randn(2, 5, 16) * 10, lengths_mask([5, 5], 5)).memory
    torch.testing.assert_close(memory.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_residual_wiring():
    x, y = torch.randn(3, 8) * 5 + 2, torch.randn(3, 8)
    layer_norm = torch.nn.functional.layer_norm
    pre, post = Residual(8, 0.0, pre_norm=True), Residual(8, 0.0, pre_norm=False)
    h, residual = pre.before(x)
    torch.testing.assert_close(h, layer_norm(x, (8,)))
    assert residual is x
    torch.testing.assert_close(pre.after(x, y), x + y)
    assert all(t is x for t in post.before(x))
    torch.testing.assert_close(post.after(x, y), layer_norm(x + y, (8,)))


# ----------------------------------------------------------------------------------------------
# decoder


def test_decoder_is_causal():
    torch.manual_seed(0)
    dec = decoder()
    enc = memory_with_padding([5, 3])
    tgt = torch.randn(2, 6, 16)
    out, _, _ = dec(tgt, enc, dec.init_state(enc))
    changed = tgt.clone()
    changed[:, 4] = torch.randn(2, 16)
    out2, _, _ = dec(changed, enc, dec.init_state(enc))
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


@pytest.mark.parametrize("norm,positions", [("pre", "sinusoidal"), ("post", "learned")])
def test_incremental_decoding_equals_teacher_forcing(norm, positions):
    torch.manual_seed(0)
    dec = decoder(input_size=12, memory_size=10, norm=norm, positions=positions)
    dec.return_attention = True
    enc = memory_with_padding([4, 2, 6], size=10)
    tgt = torch.randn(3, 5, 12)
    full, full_state, full_attn = dec(tgt, enc, dec.init_state(enc))
    outputs, weights, state = step_by_step(dec, tgt, enc, dec.init_state(enc), range(5))
    torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(weights, 1), full_attn, atol=1e-5, rtol=0)
    assert full_attn.shape == (3, 5, 7) and torch.all(full_attn[1, :, 2:] == 0)
    assert state.keys() == full_state.keys()
    assert torch.equal(state["pos"], torch.full((3,), 5))
    assert state["k1"].shape == (3, 4, 5, 4) and state["mk1"].shape == (3, 4, 7, 4)
    torch.testing.assert_close(state["v0"], full_state["v0"], atol=1e-5, rtol=0)


def test_incremental_decoding_after_reordering_the_batch():
    torch.manual_seed(0)
    dec = decoder()
    enc = memory_with_padding([4, 2, 6])
    tgt = torch.randn(3, 6, 16)
    _, _, state = step_by_step(dec, tgt, enc, dec.init_state(enc), range(3))
    index = torch.tensor([2, 0, 0, 1])  # beam-search style: rows expanded and permuted
    state = dec.reorder_state(state, index)
    enc_reordered, tgt_reordered = enc.index_select(index), tgt.index_select(0, index)
    outputs, _, _ = step_by_step(dec, tgt_reordered, enc_reordered, state, range(3, 6))
    full, _, _ = dec(tgt_reordered, enc_reordered, dec.init_state(enc_reordered))
    torch.testing.assert_close(torch.cat(outputs, 1), full[:, 3:], atol=1e-5, rtol=0)


def test_reordering_within_sentences_keeps_the_memory_keys_and_values():
    """Beam search permutes hypotheses within their sentences: the memory K/V are kept (not copied), and
    decoding goes on exactly as with every state tensor reordered; any other index selects them."""
    torch.manual_seed(0)
    dec = decoder()
    enc = memory_with_padding([4, 2, 6])
    expand = torch.tensor([0, 0, 1, 1, 2, 2])  # beam 2
    enc_rows, tgt = enc.index_select(expand), torch.randn(6, 5, 16)
    with torch.no_grad():
        _, _, state = step_by_step(dec, tgt, enc_rows, dec.reorder_state(dec.init_state(enc), expand), range(2))
        within = torch.tensor([1, 1, 2, 3, 5, 4])  # per sentence: beams permuted / duplicated
        kept = dec.reorder_state(state, within)
        assert kept["mk0"] is state["mk0"] and kept["mv1"] is state["mv1"]
        everything = {k: v.index_select(0, within) for k, v in state.items()}
        tgt_within = tgt.index_select(0, within)
        ours, _, _ = step_by_step(dec, tgt_within, enc_rows, kept, range(2, 5))
        reference, _, _ = step_by_step(dec, tgt_within, enc_rows, everything, range(2, 5))
        torch.testing.assert_close(torch.cat(ours, 1), torch.cat(reference, 1), atol=0, rtol=0)
        shrink = dec.reorder_state(state, torch.tensor([4, 5, 0]))  # sentences leave the batch
        torch.testing.assert_close(shrink["mk0"], state["mk0"].index_select(0, torch.tensor([4, 5, 0])))
        across = dec.reorder_state(state, torch.tensor([2, 3, 0, 1, 4, 5]))  # sentences swapped
        assert torch.equal(across["mv0"], state["mv0"].index_select(0, torch.tensor([2, 3, 0, 1, 4, 5])))


def test_attention_weights_only_on_request_and_in_eval_mode():
    dec = decoder()
    enc = memory_with_padding([3])
    assert dec(torch.randn(1, 2, 16), enc, dec.init_state(enc))[2] is None  # search does not need them
    dec.return_attention = True
    assert dec(torch.randn(1, 2, 16), enc, dec.init_state(enc))[2] is not None
    dec.train()
    assert dec(torch.randn(1, 2, 16), enc, dec.init_state(enc))[2] is None


def test_learned_positions_stop_at_max_positions_but_sinusoidal_ones_extend():
    enc = memory_with_padding([3])
    learned = decoder(positions="learned", max_positions=4)
    with pytest.raises(NmtError, match="model.decoder.max_positions: .*position 4"):
        learned(torch.randn(1, 5, 16), enc, learned.init_state(enc))
    sinusoidal = decoder(max_positions=4)
    _, state, _ = sinusoidal(torch.randn(1, 5, 16), enc, sinusoidal.init_state(enc))
    out, _, _ = sinusoidal(torch.randn(1, 1, 16), enc, state)
    assert out.shape == (1, 1, 16) and sinusoidal.input.table.size(0) == 6


def test_decoder_rejects_other_attention_types():
    with pytest.raises(NmtError, match="model.attention.type: the transformer decoder has its own"):
        decoder(attention="bahdanau")
    assert decoder(attention="multihead").output_size == 16


def test_all_parameters_get_gradients():
    torch.manual_seed(0)
    enc, dec = encoder(input_size=12).train(), decoder(input_size=12).train()
    memory = enc(torch.randn(2, 5, 12), lengths_mask([5, 3], 5))
    out, _, _ = dec(torch.randn(2, 4, 12), memory, dec.init_state(memory))
    # a random projection: the sum of a LayerNorm's output does not depend on its input (gradient 0)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_typo_in_transformer_options_suggests_the_key():
    with pytest.raises(NmtError, match=r"model.encoder.ff_siz: unknown key \(did you mean 'ff_size'\?\)"):
        from_dict({"model": {"encoder": {"type": "transformer", "ff_siz": 8}}})
    with pytest.raises(NmtError, match="model.decoder.norm: must be one of 'pre', 'post'"):
        from_dict({"model": {"decoder": {"type": "transformer", "norm": "prenorm"}}})


# ----------------------------------------------------------------------------------------------
# the whole model: recipes, hybrids, multihead inside the RNN decoder


def model_from(model: dict, vocab: int = 30):
    torch.manual_seed(0)
    cfg = from_dict({"model": model})
    return zoo.build_model(cfg.model, vocab, vocab)


def batch(vocab: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(4, vocab, (3, 7))
    src[1, 4:] = PAD_ID
    src[2, 2:] = PAD_ID
    return src, torch.randint(4, vocab, (3, 5))


def check_trains_and_decodes(model) -> None:
    """forward/backward gives every parameter a gradient; decode_step matches teacher forcing."""
    src, tgt = batch(model.src_vocab_size)
    model.train()
    model(src, tgt).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    model.eval()
    with torch.no_grad():
        full = torch.log_softmax(model(src, tgt).float(), dim=-1)
        enc = model.encode(src)
        state = model.init_state(enc)
        for t in range(tgt.size(1)):
            log_probs, state, _ = model.decode_step(tgt[:, t], enc, state)
            torch.testing.assert_close(log_probs, full[:, t], atol=1e-5, rtol=0)


def test_transformer_model_with_shared_embeddings():
    shared = {"src_dim": 16, "tgt_dim": 16, "share_src_tgt": True, "tie_output": True, "scale": True}
    model = model_from({"encoder": {"type": "transformer", **SMALL},
                        "decoder": {"type": "transformer", **SMALL}, "embeddings": shared})
    assert model.src_embed is model.tgt_embed and model.output_layer.weight is model.tgt_embed.weight
    check_trains_and_decodes(model)


@needs_rnn
def test_rnn_decoder_with_multihead_attention():
    model = model_from({"encoder": {"type": "rnn", "hidden_size": 8},
                        "decoder": {"type": "rnn", "hidden_size": 12},
                        "attention": {"type": "multihead", "heads": 3},
                        "embeddings": {"src_dim": 8, "tgt_dim": 8}})
    assert isinstance(model.decoder.attention, MultiHead)
    check_trains_and_decodes(model)


@needs_rnn
def test_hybrid_transformer_encoder_rnn_decoder():
    model = model_from({"encoder": {"type": "transformer", **SMALL},
                        "decoder": {"type": "rnn", "hidden_size": 12, "direct_connection": True},
                        "attention": {"type": "multihead", "heads": 2},
                        "embeddings": {"src_dim": 8, "tgt_dim": 8}})
    check_trains_and_decodes(model)


@needs_rnn
def test_hybrid_rnn_encoder_transformer_decoder():
    model = model_from({"encoder": {"type": "rnn", "hidden_size": 10},  # memory 20 != d_model 16
                        "decoder": {"type": "transformer", **SMALL},
                        "embeddings": {"src_dim": 8, "tgt_dim": 8}})
    check_trains_and_decodes(model)


@needs_rnn
@pytest.mark.parametrize("recipe", ["transformer.yaml", "hybrid_transformer_enc_lstm_dec.yaml",
                                    "hybrid_rnn_enc_transformer_dec.yaml"])
def test_recipes_load_and_build(recipe):
    cfg = load_config(CONFIGS / recipe)
    model = zoo.build_model(cfg.model, 1000, 1000)
    src, tgt = batch(1000)
    assert model(src, tgt).shape == (3, 5, 1000)


def test_residual_stream_is_in_the_autocast_dtype_and_close_to_fp32():
    """Under bf16 autocast the encoder and decoder states are bf16 end to end (no fp32 copies of the
    residual stream), and stay within bf16 rounding of the fp32 computation."""
    torch.manual_seed(0)
    enc, dec = encoder(input_size=12).eval(), decoder(input_size=12).eval()
    src, tgt, mask = torch.randn(2, 5, 12), torch.randn(2, 4, 12), lengths_mask([5, 3], 5)

    def run():
        memory = enc(src, mask)
        return memory.memory, dec(tgt, memory, dec.init_state(memory))[0]

    ref_memory, ref_out = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory, out = run()
    assert memory.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(memory.float(), ref_memory, atol=0.1, rtol=0)
    torch.testing.assert_close(out.float(), ref_out, atol=0.1, rtol=0)
