"""The RNN encoder and decoder: shapes, padding, the seed formulas, incremental == teacher forcing."""

import itertools

import pytest
import torch

from nmt.config import COMPONENT_SCHEMAS, build, from_dict
from nmt.errors import NmtError
from nmt.models import zoo
from nmt.models.interfaces import EncoderOutput
from nmt.models.rnn import ContextGate
from nmt.vocab import BOS_ID, PAD_ID

E, M, H = 5, 12, 12  # embedding, memory (encoder output) and decoder hidden sizes; M == H for luong_dot


def options(kind: str, name: str, **values):
    return build(COMPONENT_SCHEMAS[kind][name], values)


def make_encoder(**values):
    return zoo.build_encoder(options("encoder", "rnn", **values), E).eval()


def make_decoder(attention: str = "none", attention_options: dict | None = None, **values):
    values.setdefault("hidden_size", H)
    attn = options("attention", attention, **(attention_options or {}))
    return zoo.build_decoder(options("decoder", "rnn", **values), E, M, attn).eval()


def lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def encoder_inputs(lengths=(5, 2, 4), total=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), total, E, generator=gen), lengths_mask(list(lengths), total)


def fake_encoding(lengths=(6, 3, 1), seed=0) -> EncoderOutput:
    gen = torch.Generator().manual_seed(seed)
    mask = lengths_mask(list(lengths), max(lengths))
    return EncoderOutput(torch.randn(len(lengths), max(lengths), M, generator=gen), mask,
                         torch.randn(len(lengths), M, generator=gen))


# ----------------------------------------------------------------------------------------------
# Encoder


CELLS = ["lstm", "gru", "rnn"]


@pytest.mark.parametrize("cell,bidirectional,layers", list(itertools.product(CELLS, [True, False], [1, 2])))
def test_encoder_shapes(cell, bidirectional, layers):
    encoder = make_encoder(cell=cell, bidirectional=bidirectional, layers=layers, hidden_size=7)
    emb, mask = encoder_inputs()
    out = encoder(emb, mask)
    directions = 2 if bidirectional else 1
    assert encoder.output_size == 7 * directions
    assert out.memory.shape == (3, 5, 7 * directions)
    assert out.final.shape == (3, 7 * directions)
    assert out.mask is mask


@pytest.mark.parametrize("cell,bidirectional", list(itertools.product(CELLS, [True, False])))
def test_encoder_ignores_extra_padding(cell, bidirectional):
    torch.manual_seed(0)
    encoder = make_encoder(cell=cell, bidirectional=bidirectional, layers=2, hidden_size=6)
    emb, mask = encoder_inputs()
    padded_emb = torch.cat([emb, torch.randn(3, 3, E) * 100], dim=1)  # garbage in the padding
    padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    padded_emb[:, :5] = padded_emb[:, :5].masked_fill(~mask.unsqueeze(-1), 100.0)
    short, long = encoder(emb, mask), encoder(padded_emb, padded_mask)
    real = mask.unsqueeze(-1)
    torch.testing.assert_close(long.memory[:, :5] * real, short.memory * real)
    torch.testing.assert_close(long.final, short.final)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_encoder_final_is_forward_last_real_and_backward_first(bidirectional):
    encoder = make_encoder(cell="gru", bidirectional=bidirectional, hidden_size=4)
    emb, mask = encoder_inputs(lengths=(5, 2, 4))
    out = encoder(emb, mask)
    for b, length in enumerate([5, 2, 4]):
        torch.testing.assert_close(out.final[b, :4], out.memory[b, length - 1, :4])
        if bidirectional:
            torch.testing.assert_close(out.final[b, 4:], out.memory[b, 0, 4:])


def test_plain_rnn_encoder_follows_the_seed_formula():
    encoder = make_encoder(cell="rnn", bidirectional=False, hidden_size=4)
    emb, mask = encoder_inputs(lengths=(5,), total=5)
    rnn = encoder.rnn
    h = torch.zeros(4)
    for t in range(5):  # h_t = tanh(W_xh x_t + W_hh h_{t-1} + b_h)
        h = torch.tanh(rnn.weight_ih_l0 @ emb[0, t] + rnn.weight_hh_l0 @ h + rnn.bias_ih_l0 + rnn.bias_hh_l0)
        torch.testing.assert_close(encoder(emb, mask).memory[0, t], h)


def test_recurrent_weights_start_orthogonal():
    rnn = make_encoder(cell="lstm", hidden_size=6).rnn
    for gate in rnn.weight_hh_l0.detach().chunk(4):
        torch.testing.assert_close(gate @ gate.T, torch.eye(6), atol=1e-5, rtol=0)
    assert torch.all(rnn.bias_ih_l0.detach()[6:12] == 1)  # forget gate


def test_encoder_survives_empty_sentences():
    encoder = make_encoder(cell="lstm")
    emb, _ = encoder_inputs(lengths=(3, 0), total=3)
    out = encoder(emb, lengths_mask([3, 0], 3))
    assert torch.isfinite(out.final).all() and torch.isfinite(out.memory).all()
    empty = encoder(torch.zeros(2, 0, E), torch.zeros(2, 0, dtype=torch.bool))
    assert empty.memory.shape == (2, 0, encoder.output_size) and empty.final.shape == (2, encoder.output_size)


# ----------------------------------------------------------------------------------------------
# Decoder

ATTENTIONS = ["none", "bahdanau", "luong_dot", "luong_general", "luong_concat", "multihead"]
GATES = ["none", "source", "target", "both"]


def _valid(attention, gate, direct):
    return gate == "none" or attention != "none" or direct


DECODER_GRID = [
    (attention, feeding, direct, gate)
    for attention, feeding, direct, gate in itertools.product(ATTENTIONS, [True, False], [False, True], GATES)
    if _valid(attention, gate, direct)
]


def _incremental(decoder, emb, enc):
    state = decoder.init_state(enc)
    outputs, weights = [], []
    for t in range(emb.size(1)):
        out, state, alpha = decoder(emb[:, t:t + 1], enc, state)
        outputs.append(out)
        weights.append(alpha)
    return torch.cat(outputs, 1), state, None if weights[0] is None else torch.cat(weights, 1)


@pytest.mark.parametrize("attention,feeding,direct,gate", DECODER_GRID)
def test_incremental_decoding_equals_teacher_forcing(attention, feeding, direct, gate):
    torch.manual_seed(0)
    decoder = make_decoder(attention, cell="lstm", layers=2, input_feeding=feeding,
                           direct_connection=direct, context_gate=gate)
    enc = fake_encoding()
    emb = torch.randn(3, 5, E)
    full, full_state, full_weights = decoder(emb, enc, decoder.init_state(enc))
    steps, step_state, step_weights = _incremental(decoder, emb, enc)
    assert full.shape == (3, 5, decoder.output_size)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    assert full_state.keys() == step_state.keys()
    for key in full_state:
        torch.testing.assert_close(step_state[key], full_state[key], atol=1e-5, rtol=0)
    if attention == "none":
        assert full_weights is None and step_weights is None
    else:
        assert full_weights.shape == (3, 5, 6)
        assert torch.all(full_weights.masked_select(~enc.mask.unsqueeze(1)) == 0)
        torch.testing.assert_close(step_weights, full_weights, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention,feeding", [("none", True), ("luong_general", False), ("bahdanau", True)])
def test_state_carries_earlier_target_tokens_forward(attention, feeding):
    torch.manual_seed(0)
    decoder = make_decoder(attention, input_feeding=feeding)
    enc, emb = fake_encoding(), torch.randn(3, 4, E)
    edited = emb.clone()
    edited[:, 0] += 1.0
    out, state, _ = decoder(emb, enc, decoder.init_state(enc))
    out_edited, state_edited, _ = decoder(edited, enc, decoder.init_state(enc))
    assert not torch.allclose(out[:, -1], out_edited[:, -1])
    assert not torch.allclose(state["h"], state_edited["h"])


@pytest.mark.parametrize("cell,init", list(itertools.product(CELLS, ["bridge", "zeros"])))
def test_decoder_cells_and_init(cell, init):
    decoder = make_decoder("luong_general", cell=cell, layers=2, init=init)
    enc = fake_encoding()
    state = decoder.init_state(enc)
    assert state["h"].shape == (3, 2, H)
    assert ("c" in state) == (cell == "lstm")
    assert state["keys"].shape == (3, 6, H) and state["feed"].shape == (3, H)
    if init == "zeros":
        assert torch.all(state["h"] == 0)
    else:
        expected = torch.tanh(decoder.bridge(enc.final)).view(3, 2, H)
        torch.testing.assert_close(state["h"], expected)
    emb = torch.randn(3, 4, E)
    full, _, _ = decoder(emb, enc, state)
    steps, _, _ = _incremental(decoder, emb, enc)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_single_steps_drop_out_between_layers_in_training_only():
    """One-position steps go through torch's cell ops (`_cell_step`), which must apply nn.RNN's dropout
    between layers exactly when nn.RNN would: in training, not after the top layer."""
    torch.manual_seed(0)
    decoder = make_decoder("bahdanau", cell="lstm", layers=2, dropout=0.5)
    decoder.dropout.p = 0.0  # only the between-layer dropout varies
    enc, emb = fake_encoding(), torch.randn(3, 1, E)
    evaluated, _, _ = decoder(emb, enc, decoder.init_state(enc))
    decoder.train()
    trained = [decoder(emb, enc, decoder.init_state(enc))[0] for _ in range(2)]
    assert not torch.allclose(trained[0], trained[1]) and not torch.allclose(trained[0], evaluated)
    decoder.rnn.dropout = 0.0
    torch.testing.assert_close(decoder(emb, enc, decoder.init_state(enc))[0], evaluated)


def test_bridge_falls_back_to_the_mean_of_memory_when_the_encoder_has_no_final_state():
    decoder = make_decoder("none")
    enc = fake_encoding()
    no_final = EncoderOutput(enc.memory, enc.mask, None)
    mask = enc.mask.unsqueeze(-1).float()
    mean = (enc.memory * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(decoder.init_state(no_final)["h"][:, 0], torch.tanh(decoder.bridge(mean)))


def test_direct_connection_feeds_the_source_summary_into_every_step():
    torch.manual_seed(0)
    emb, enc = torch.randn(3, 4, E), fake_encoding()
    other = EncoderOutput(enc.memory, enc.mask, enc.final + 1.0)
    direct = make_decoder("none", init="zeros", direct_connection=True)
    plain = make_decoder("none", init="zeros", direct_connection=False)
    for decoder, should_change in [(direct, True), (plain, False)]:
        a, _, _ = decoder(emb, enc, decoder.init_state(enc))
        b, _, _ = decoder(emb, other, decoder.init_state(other))
        assert (not torch.allclose(a, b)) == should_change
    assert direct.rnn.input_size == E + M and plain.rnn.input_size == E


@pytest.mark.parametrize("attention,query", [("bahdanau", "auto"), ("luong_dot", "previous")])
def test_bahdanau_ordering_attends_with_the_previous_state(attention, query):
    torch.manual_seed(0)
    decoder = make_decoder(attention, layers=2, attention_query=query)
    assert decoder.attend_first and not decoder.input_feeding
    assert decoder.rnn.input_size == E + M  # e(y_{t-1}) and c_t
    enc, emb = fake_encoding(), torch.randn(3, 1, E)
    state = decoder.init_state(enc)
    _, _, alpha = decoder(emb, enc, state)
    _, expected = decoder.attention(state["h"][:, -1:], state["keys"], enc.memory, enc.mask)
    torch.testing.assert_close(alpha, expected)


def test_luong_ordering_is_the_default_except_for_bahdanau():
    assert not make_decoder("luong_general").attend_first
    assert not make_decoder("bahdanau", attention_query="current").attend_first


def test_input_feeding_feeds_the_previous_attentional_vector():
    torch.manual_seed(0)
    decoder = make_decoder("luong_general", input_feeding=True)
    assert decoder.rnn.input_size == E + H
    enc, emb = fake_encoding(), torch.randn(3, 2, E)
    out, state, _ = decoder(emb, enc, decoder.init_state(enc))
    torch.testing.assert_close(state["feed"], out[:, -1])
    state["feed"] = state["feed"] + 1.0
    changed, _, _ = decoder(emb[:, :1], enc, state)
    unchanged, _, _ = decoder(emb[:, :1], enc, {**state, "feed": out[:, -1]})
    assert not torch.allclose(changed, unchanged)


def test_attentional_vector_is_tanh_of_w_c_on_state_and_context():
    decoder = make_decoder("luong_dot", input_feeding=False, layers=1, cell="gru")
    enc, emb = fake_encoding(), torch.randn(3, 3, E)
    out, _, weights = decoder(emb, enc, decoder.init_state(enc))
    s, _ = decoder.rnn(emb, decoder.init_state(enc)["h"].transpose(0, 1).contiguous())
    context = weights @ enc.memory
    torch.testing.assert_close(out, torch.tanh(decoder.combine(torch.cat([s, context], -1))))


def test_without_any_context_the_output_is_the_rnn_state():
    decoder = make_decoder("none", cell="gru", init="zeros")
    emb, enc = torch.randn(3, 4, E), fake_encoding()
    out, _, _ = decoder(emb, enc, decoder.init_state(enc))
    s, _ = decoder.rnn(emb, torch.zeros(1, 3, H))
    torch.testing.assert_close(out, s)


@pytest.mark.parametrize("mode", ["source", "target", "both"])
def test_context_gate_formulas(mode):
    torch.manual_seed(0)
    gate = ContextGate(mode, embedding_size=3, state_size=4, context_size=5, output_size=6)
    emb, s, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 5)
    z = torch.sigmoid(gate.gate(torch.cat([emb, s, c], -1)))
    target, source = gate.target_proj(torch.cat([emb, s], -1)), gate.source_proj(c)
    expected = {"source": torch.tanh(target + z * source), "target": torch.tanh(z * target + source),
                "both": torch.tanh((1 - z) * target + z * source)}[mode]
    torch.testing.assert_close(gate(emb, s, c), expected)


def test_context_gate_needs_a_context():
    with pytest.raises(NmtError, match=r"model\.decoder\.context_gate"):
        make_decoder("none", context_gate="both")


def test_reorder_state_selects_rows():
    decoder = make_decoder("bahdanau")
    state = decoder.init_state(fake_encoding())
    index = torch.tensor([2, 2, 0])
    reordered = decoder.reorder_state(state, index)
    for key, value in state.items():
        torch.testing.assert_close(reordered[key], value[index])


# ----------------------------------------------------------------------------------------------
# Through the config and the whole model


def _model_config(**model):
    return from_dict({"model": {
        "encoder": {"type": "rnn", "cell": "gru", "hidden_size": 6, "layers": 2},
        "decoder": {"type": "rnn", "cell": "lstm", "hidden_size": 8, "direct_connection": True,
                    "context_gate": "both"},
        "attention": {"type": "bahdanau"},
        "embeddings": {"src_dim": 5, "tgt_dim": 7}, **model}})


def test_tiny_model_forward_backward_and_greedy_steps_agree():
    torch.manual_seed(0)
    model = zoo.build_model(_model_config().model, 20, 22)
    src = torch.tensor([[5, 6, 7, 8], [9, 10, PAD_ID, PAD_ID]])
    tgt_in = torch.tensor([[BOS_ID, 11, 12], [BOS_ID, 13, PAD_ID]])
    logits = model(src, tgt_in)
    assert logits.shape == (2, 3, 22)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 22), torch.randint(4, 22, (6,)))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    with torch.no_grad():
        full = torch.log_softmax(model(src, tgt_in), -1)
        enc = model.encode(src)
        state = model.init_state(enc)
        for t in range(3):
            log_probs, state, attn = model.decode_step(tgt_in[:, t], enc, state)
            torch.testing.assert_close(log_probs, full[:, t], atol=1e-5, rtol=0)
            assert attn.shape == (2, 4) and torch.all(attn[1, 2:] == 0)


def test_rnn_decoder_pairs_with_the_transformer_encoder():
    model = zoo.build_model(_model_config(encoder={"type": "transformer"}).model, 20, 22)
    logits = model(torch.tensor([[5, 6, 7]]), torch.tensor([[BOS_ID, 11]]))
    assert logits.shape == (1, 2, 22)


def test_options_typo_suggests_the_field():
    with pytest.raises(NmtError, match=r"model\.encoder\.cel: unknown key \(did you mean 'cell'\?\)"):
        from_dict({"model": {"encoder": {"type": "rnn", "cel": "gru"}}})


def test_bad_cell_name_is_reported_with_the_choices():
    with pytest.raises(NmtError, match=r"model\.decoder\.cell: must be one of .*did you mean 'gru'"):
        from_dict({"model": {"decoder": {"type": "rnn", "cell": "gruu"}}})
