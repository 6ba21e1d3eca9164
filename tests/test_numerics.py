"""Decoding in bf16 weights or with int8 Linear layers: converted copies, close to fp32, the original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmt.config import from_dict
from nmt.errors import NmtError
from nmt.inference.numerics import check_quantize, decoding_device, decoding_model
from nmt.models.zoo import build_model

LAYER = {"type": "transformer", "layers": 2, "d_model": 32, "heads": 4, "ff_size": 64, "dropout": 0.1}
MODELS = {
    "transformer": {"encoder": LAYER, "decoder": LAYER, "attention": {"type": "none"},
                    "embeddings": {"src_dim": 32, "tgt_dim": 32, "tie_output": True, "scale": True}},
    "lstm_bahdanau": {"encoder": {"type": "rnn", "cell": "lstm", "hidden_size": 16, "bidirectional": True},
                      "decoder": {"type": "rnn", "cell": "lstm", "hidden_size": 16},
                      "attention": {"type": "bahdanau"}, "embeddings": {"src_dim": 16, "tgt_dim": 16}},
}


def first_step_log_probs(model: nn.Module, src: torch.Tensor) -> torch.Tensor:
    enc = model.encode(src)
    bos = torch.full((src.size(0),), 2, dtype=torch.long)
    return model.decode_step(bos, enc, model.init_state(enc))[0]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("precision, quantize, tolerance", [("bf16", "none", 0.05), ("fp32", "int8", 0.2)])
def test_converted_copy_is_close_to_fp32_and_leaves_the_model_alone(name, precision, quantize, tolerance):
    torch.manual_seed(0)
    model = build_model(from_dict({"model": MODELS[name]}).model, 50, 50).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = torch.randint(4, 50, (3, 7))
    with torch.inference_mode():
        reference = first_step_log_probs(model, src)
        with decoding_model(model, precision, "cpu", quantize) as converted:
            assert converted is not model
            log_probs = first_step_log_probs(converted, src)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    assert (log_probs - reference).abs().max() < tolerance
    if precision == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in converted.parameters())
    else:
        assert not any(type(m) is nn.Linear for m in converted.modules())  # every Linear became int8
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_fp32_decodes_with_the_model_itself():
    model = nn.Linear(2, 2)
    with decoding_model(model, "fp32", "cpu") as same:
        assert same is model


def test_quantize_choices_are_checked():
    assert check_quantize("none", "bf16", "cpu") == "none"
    assert check_quantize("int8", "fp32", "cpu") == "int8"
    with pytest.raises(NmtError, match="^--quantize: expected one of none, int8, got 'int4'$"):
        check_quantize("int4", "fp32", "cpu")
    with pytest.raises(NmtError, match="--quantize int8 replaces --precision bf16"):
        check_quantize("int8", "bf16", "cpu")
    with pytest.raises(NmtError, match="--quantize int8 runs on the CPU only"):
        check_quantize("int8", "fp32", "cuda")


def test_device_auto_decodes_int8_on_the_cpu():
    assert decoding_device("auto", "int8") == "cpu"
    assert decoding_device("auto", "none") == "auto"
    assert decoding_device("cuda", "int8") == "cuda"  # an explicit choice stays, and check_quantize names it
