"""How a trained model computes while it decodes: fp32, bf16 weights, fp16 autocast or int8 Linear layers.

- fp32: the model as it is.
- bf16: a copy of the model with bf16 weights. Autocast would cast every weight again at every
  decoding step (a decoding step is small, so those casts are a large share of it); a copy casts them
  once. LayerNorm and softmax keep fp32 accumulation inside, and the search's log-probabilities are fp32.
- fp16 (CUDA): autocast, whose fp32 LayerNorm and residual stream keep fp16's small range safe.
- int8 (`quantize="int8"`, CPU, fp32): a copy whose Linear layers (and LSTM/GRU layers) are dynamically
  quantized: int8 weights, activations quantized per call, fp32 everywhere else.

The original model is never changed, so the trainer can decode its validation set with it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from nmt.errors import NmtError
from nmt.training.precision import autocast

QUANTIZE_CHOICES = ("none", "int8")


def decoding_device(device: str, quantize: str) -> str:
    """`--device` for decoding: 'auto' means the CPU with --quantize int8 (CPU-only), as it does without a GPU."""
    return "cpu" if quantize == "int8" and device.strip().lower() == "auto" else device


def check_quantize(quantize: str, precision: str, device: torch.device | str) -> str:
    """`quantize` if it can run with this precision on this device, else an NmtError naming --quantize."""
    if quantize not in QUANTIZE_CHOICES:
        raise NmtError(f"--quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize == "int8":
        if torch.device(device).type != "cpu":
            raise NmtError(f"--quantize int8 runs on the CPU only (this run is on {torch.device(device).type}); "
                           "use --device cpu, or --precision bf16 on a GPU")
        if precision != "fp32":
            raise NmtError(f"--quantize int8 replaces --precision {precision}: int8 layers compute in fp32 "
                           "around their int8 matmuls; drop --precision")
    return quantize


@contextlib.contextmanager
def decoding_model(model: nn.Module, precision: str, device: torch.device | str,
                   quantize: str = "none") -> Iterator[nn.Module]:
    """The model to decode with in `precision` ('fp32' | 'bf16' | 'fp16'): `model` itself for fp32 and
    fp16 (the enclosed block then runs under autocast), else a converted copy in eval mode. `model` is
    never changed."""
    check_quantize(quantize, precision, device)
    if quantize == "int8":
        yield quantized_int8(model)
    elif precision == "bf16":
        yield copy.deepcopy(model).to(torch.bfloat16).eval()
    else:
        with autocast(precision, device):
            yield model


def quantized_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with dynamically quantized int8 Linear, LSTM and GRU layers (CPU)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)
