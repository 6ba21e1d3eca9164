"""Registries of encoders, decoders and attentions, and `build_model`.

Adding an architecture = one module that registers its classes + one YAML recipe in configs/.
Constructor contracts:
  encoder:   cls(options, input_size)                                  -> Encoder
  decoder:   cls(options, input_size, memory_size, attention_options)  -> Decoder
  attention: cls(options, query_size, memory_size)                     -> Attention
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nmt.config import Component, ModelConfig, register_schema

ENCODERS: dict[str, type] = {}
DECODERS: dict[str, type] = {}
ATTENTIONS: dict[str, type] = {}
_REGISTRIES = {"encoder": ENCODERS, "decoder": DECODERS, "attention": ATTENTIONS}


def _register(kind: str, name: str, schema: type) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        registry = _REGISTRIES[kind]
        if name in registry:
            raise ValueError(f"{kind} {name!r} registered twice")
        registry[name] = cls
        register_schema(kind, name, schema)
        return cls

    return decorator


def register_encoder(name: str, schema: type) -> Callable[[type], type]:
    """Class decorator: make an Encoder selectable as `model.encoder.type: name`."""
    return _register("encoder", name, schema)


def register_decoder(name: str, schema: type) -> Callable[[type], type]:
    """Class decorator: make a Decoder selectable as `model.decoder.type: name`."""
    return _register("decoder", name, schema)


def register_attention(name: str, schema: type) -> Callable[[type], type]:
    """Class decorator: make an Attention selectable as `model.attention.type: name`."""
    return _register("attention", name, schema)


def build_encoder(options: Component, input_size: int) -> Any:
    return ENCODERS[options.type](options, input_size)


def build_decoder(options: Component, input_size: int, memory_size: int, attention: Component) -> Any:
    return DECODERS[options.type](options, input_size, memory_size, attention)


def build_attention(options: Component, query_size: int, memory_size: int) -> Any:
    """The attention module for `options`, or None for `type: none`."""
    if options.type == "none":
        return None
    return ATTENTIONS[options.type](options, query_size, memory_size)


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Any:
    """The EncoderDecoder described by `cfg` for the given vocabulary sizes."""
    from nmt.models.encoder_decoder import EncoderDecoder

    return EncoderDecoder(cfg, src_vocab_size, tgt_vocab_size)
