"""Compressed outer gradients: codecs, and a reducer that sends the encoded bytes.

* :mod:`eagerloco.compression.codecs` -- ``none`` (fp32), ``bf16``, ``fp16``, ``fp8`` (e4m3, per-block scale),
  ``int8`` (per-block absmax scale) and ``fp4`` (E3M0, per-block scale, two codes per byte): each encodes a
  flat fp32 tensor into ONE contiguous uint8 payload of an exact, known size, with a documented error bound.
* :class:`CompressedReducer` -- one asynchronous all-gather of the encoded payloads, decoded and summed in fp32
  in rank order at ``wait()``; optional error feedback.
* :func:`make_reducer` -- what the engine calls: fp32 all-reduce for ``'none'``, a compressed reducer otherwise.

Formats, sizes, error bounds and the wire cost are in docs/compression.md.
"""

from eagerloco.compression.codecs import (
    CODECS,
    DEFAULT_BLOCK_SIZE,
    FP4_CODE_VALUES,
    FP4_MAGNITUDES,
    FP4_THRESHOLDS,
    BF16Codec,
    Codec,
    Encoded,
    FP4Codec,
    FP8Codec,
    FP16Codec,
    Int8Codec,
    NoneCodec,
    get_codec,
    pack_nibbles,
    relative_rms_error,
    unpack_nibbles,
)
from eagerloco.compression.reducer import CompressedReducer, make_reducer

__all__ = [
    "CODECS",
    "DEFAULT_BLOCK_SIZE",
    "FP4_CODE_VALUES",
    "FP4_MAGNITUDES",
    "FP4_THRESHOLDS",
    "BF16Codec",
    "Codec",
    "CompressedReducer",
    "Encoded",
    "FP4Codec",
    "FP8Codec",
    "FP16Codec",
    "Int8Codec",
    "NoneCodec",
    "get_codec",
    "make_reducer",
    "pack_nibbles",
    "relative_rms_error",
    "unpack_nibbles",
]
