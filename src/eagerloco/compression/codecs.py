"""Codecs for outer gradients: a flat fp32 tensor in, ONE contiguous uint8 payload out, and back.

Every codec turns a flat fp32 tensor ``x`` of ``n`` values into a 1-D ``torch.uint8`` payload of exactly
``encoded_nbytes(n)`` bytes (a function of ``n`` alone, so every worker can allocate the all-gather output before
any byte arrives), and decodes such a payload back to ``n`` fp32 values. Pure torch, vectorised (no Python loop
over elements or blocks), on any device where the needed dtypes exist; a payload is bit-identical on CPU and
CUDA for the same input.

Codecs (``n`` values, block size ``B``, ``nb = ceil(n / B)`` blocks):

======  ============================================  ================  =====================================
name    format                                        bytes             worst-case error |x̂ - x|
======  ============================================  ================  =====================================
none    fp32, verbatim                                4·n               0
bf16    bfloat16 cast, round to nearest even          2·n               max(2⁻⁸·|x|, 2⁻¹³⁴)
fp16    float16 cast, round to nearest even           2·n               max(2⁻¹¹·|x|, 2⁻²⁵)
fp8     e4m3fn per block, block absmax ↦ 448          4·nb + n          2⁻⁴·|x| + 2⁻¹⁸·a + 2⁻¹⁴⁹
int8    symmetric, q = round(127·x/a) ∈ [-127, 127]   4·nb + n          a·(1/254 + 2⁻²⁰) + 2⁻¹⁴⁹
fp4     E3M0: sign + 3-bit exponent, two per byte     4·nb + ceil(n/2)  max(|x|/3, a/128)·(1 + 2⁻²⁰) + 2⁻¹⁴⁹
======  ============================================  ================  =====================================

where ``a`` is the absolute maximum of the block that holds ``x``. The bounds are proved in each codec's
docstring and checked elementwise by :meth:`Codec.error_bound` in the tests. The ``2⁻¹⁴⁹`` terms are fp32's own
resolution below 2⁻¹²⁶ (a decoded value that lands among fp32's subnormals is rounded there); they never matter
for outer gradients but keep the bounds true over the whole finite fp32 range.

Block codecs (fp8, int8, fp4) share one layout and one normalisation:

* ``x`` is cut into ``nb`` blocks of ``B`` consecutive values; the last block is padded with zeros for the
  computation only (the padding is never sent).
* Per block, ``a = max_i |x_i|`` (fp32) is stored verbatim as the block's scale, and every value is normalised as
  ``u = x / a`` (correctly rounded fp32 division, so ``|u| ≤ 1`` and the block maximum maps to exactly ±1; a block of
  zeros has ``a = 0`` and ``u = 0``: no 0/0). Quantising ``u`` and decoding as ``x̂ = decode(code) · a`` never
  overflows or underflows an intermediate, over the whole finite fp32 range.
* Payload = ``[a_0 … a_{nb-1}]`` (fp32, native byte order: all workers must share it, which every platform torch
  supports does: little-endian) followed by the codes (one byte per value for fp8 and int8, two 4-bit codes per
  byte for fp4). Total bytes as in the table above. A block's values that are tiny next to its maximum lose
  precision first: below ``a/128`` they flush to zero in fp4, below ``a/254`` in int8, and fp8 resolves them
  only to ``a·2⁻¹⁸``. Every bound of a block codec is therefore relative to the block absmax.

Non-finite input (NaN, ±Inf) is never encoded: :meth:`Codec.encode` raises :class:`ValueError` naming the codec
and the number of bad values. A finite value outside a cast codec's range (fp16 beyond ±65504, bf16 beyond
±3.39e38) is rejected the same way rather than sent as Inf. Checking costs one device-to-host synchronisation per
encode (on a small per-block tensor for the block codecs).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

DEFAULT_BLOCK_SIZE = 128
"""Values per scale in the block codecs: 4 bytes of scale per 128 values (fp4 payload 0.53125·n bytes)."""

FP4_MAGNITUDES: tuple[float, ...] = (0.0, 2.0**-6, 2.0**-5, 2.0**-4, 2.0**-3, 2.0**-2, 2.0**-1, 1.0)
"""Magnitude of fp4 (E3M0) exponent field ``e`` = 0..7, relative to the block absmax: 0 for ``e = 0``, else
``2^(e-7)``."""

FP4_CODE_VALUES: tuple[float, ...] = FP4_MAGNITUDES + tuple(-m if m else 0.0 for m in FP4_MAGNITUDES)
"""Value (relative to the block absmax) of each of the 16 fp4 codes ``c = 8·s + e``: sign bit ``s`` (bit 3), exponent
field ``e`` (bits 0-2). Code 8 (negative zero) decodes to +0.0 and is never produced by the encoder."""

FP4_THRESHOLDS: tuple[float, ...] = (2.0**-7, *(1.5 * 2.0**k for k in range(-6, 0)))
"""Round-to-nearest (linear domain) decision points between consecutive fp4 magnitudes: the midpoint of 0 and 2⁻⁶
is 2⁻⁷; between 2^k and 2^(k+1) it is 1.5·2^k. A value exactly on a midpoint rounds to the larger magnitude."""


@dataclass(frozen=True)
class Encoded:
    """An encoded tensor: ``payload`` is one contiguous 1-D uint8 tensor holding codes and scales."""

    payload: torch.Tensor
    numel: int
    """Number of values encoded (``decode`` needs it)."""
    codec: str

    @property
    def nbytes(self) -> int:
        return self.payload.numel()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 values 0..15) two per byte: value ``2i`` in the low nibble of byte ``i``, value
    ``2i+1`` in the high nibble. An odd count is padded with a zero code. Returns ``ceil(len/2)`` bytes."""
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise TypeError(f"pack_nibbles: codes must be uint8, got {flat.dtype}")
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1))
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``count`` 4-bit codes of ``packed`` as uint8 values 0..15."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        raise TypeError(f"unpack_nibbles: packed must be uint8, got {flat.dtype}")
    if not 0 <= count <= 2 * flat.numel():
        raise ValueError(f"unpack_nibbles: cannot read {count} codes from {flat.numel()} bytes")
    return torch.stack((flat & 0x0F, flat >> 4), dim=1).reshape(-1)[:count]


def _check_numel(numel: int) -> int:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    return numel


def _bytes_as(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a 1-D uint8 slice as ``dtype`` (copying it first if it is not aligned for that dtype)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if payload.storage_offset() % itemsize or payload.data_ptr() % itemsize:
        payload = payload.clone()
    return payload.view(dtype)


class Codec(abc.ABC):
    """Encode a flat fp32 tensor into one uint8 payload and back. See the module docstring for the formats.

    Subclasses implement ``_encode`` (input already checked: flat, contiguous, fp32, finite), ``_decode``
    (payload already checked: 1-D uint8 of the right size), ``encoded_nbytes`` and ``error_bound``.
    """

    name: ClassVar[str]
    bits_per_value: ClassVar[int]
    """Bits of code per value, scales excluded."""
    block_size: int | None
    """Values per scale (block codecs); ``None`` for the plain casts."""

    def __init__(self) -> None:
        self._devices_ok: set[str] = set()  # a racing second probe is harmless: both pass or both raise

    # ---------------------------------------------------------------------------------------------- public

    def encode(self, x: torch.Tensor) -> Encoded:
        """Encode ``x`` (fp32, any shape, read as flat) into a fresh payload (never a view of ``x``).

        Raises:
            TypeError: ``x`` is not an fp32 tensor.
            ValueError: ``x`` holds NaN or Inf (or, for fp16 / bf16, values beyond the format's range).
            RuntimeError: this codec cannot run on ``x.device``.
        """
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self.name} codec encodes fp32 tensors, got {got}")
        self.check_device(x.device)
        flat = x.detach().reshape(-1).contiguous()
        n = flat.numel()
        payload = self._encode(flat)
        expected = self.encoded_nbytes(n)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise AssertionError(  # an internal invariant: every worker sizes its buffers from encoded_nbytes
                f"{self.name} codec produced {payload.numel()} x {payload.dtype}, expected {expected} x uint8"
            )
        return Encoded(payload=payload, numel=n, codec=self.name)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """Decode a payload of ``encoded_nbytes(numel)`` bytes into a fresh flat fp32 tensor of ``numel`` values,
        on the payload's device."""
        numel = _check_numel(numel)
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            got = f"{tuple(payload.shape)} {payload.dtype}" if isinstance(payload, torch.Tensor) else type(payload)
            raise ValueError(f"{self.name} codec decodes a 1-D uint8 payload, got {got}")
        expected = self.encoded_nbytes(numel)
        if payload.numel() != expected:
            raise ValueError(
                f"{self.name} codec: a payload for {numel} values has {expected} bytes, got {payload.numel()}"
            )
        return self._decode(payload.contiguous(), numel)

    def nonfinite_payload(self, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A payload of ``encoded_nbytes(numel)`` bytes that decodes to ``numel`` NaN: what a worker sends in place
        of an outer gradient that held NaN/Inf (which :meth:`encode` refuses), so that the average every worker
        decodes is NaN and all of them take the same decision (docs/reliability.md)."""
        payload = self._nonfinite_payload(_check_numel(numel), torch.device(device))
        assert payload.dtype == torch.uint8 and payload.numel() == self.encoded_nbytes(numel)
        return payload

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``, flat."""
        encoded = self.encode(x)
        return self.decode(encoded.payload, encoded.numel)

    @abc.abstractmethod
    def encoded_nbytes(self, numel: int) -> int:
        """Exact payload size in bytes for ``numel`` values (a function of ``numel`` alone)."""

    @abc.abstractmethod
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Worst-case ``|decode(encode(x)) - x|`` for every element of ``x`` (flat, float64 so the bound itself is
        not rounded). ``x`` must be finite and encodable."""

    def check_device(self, device: torch.device | str) -> None:
        """Raise :class:`RuntimeError` if this codec cannot run on ``device``: a small encode/decode round trip is
        run there once (cached) and checked against :meth:`error_bound`. Never falls back to another format."""
        key = str(torch.device(device))
        if key in self._devices_ok:
            return
        probe = torch.tensor([1.0, -0.75, 0.3, -1e-3, 0.0, 2.5e-5, -0.015625, 0.99], dtype=torch.float32, device=device)
        try:
            decoded = self._decode(self._encode(probe), probe.numel())
            ok = bool(((decoded.double() - probe.double()).abs() <= self.error_bound(probe)).all())
        except Exception as exc:
            raise RuntimeError(f"codec {self.name!r} cannot run on device {key}: {exc}") from exc
        if not ok:
            raise RuntimeError(
                f"codec {self.name!r} gives wrong results on device {key} (round-trip error beyond its documented "
                f"bound); refusing to use it there"
            )
        self._devices_ok.add(key)

    def describe(self) -> str:
        block = f", block {self.block_size}" if self.block_size is not None else ""
        return f"{self.name} ({self.bits_per_value} bits/value{block})"

    def __repr__(self) -> str:
        block = f"block_size={self.block_size}" if self.block_size is not None else ""
        return f"{type(self).__name__}({block})"

    # ---------------------------------------------------------------------------------------------- internals

    @abc.abstractmethod
    def _encode(self, flat: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def _nonfinite_payload(self, numel: int, device: torch.device) -> torch.Tensor: ...

    def _reject_nonfinite(self, flat: torch.Tensor) -> None:
        """Raise the codec's ValueError for a tensor known to hold non-finite values (the slow path)."""
        nan = int(torch.isnan(flat).sum())
        inf = int(torch.isinf(flat).sum())
        raise ValueError(
            f"{self.name} codec: refusing to encode {nan + inf} non-finite values ({nan} NaN, {inf} Inf) out of "
            f"{flat.numel()}; outer gradients must be finite"
        )


# ---------------------------------------------------------------------------------------------------------------
# Plain casts


class _CastCodec(Codec):
    """Cast to a narrower IEEE float with round to nearest even; payload = the cast values' bytes.

    For a format with ``p`` significant bits and smallest subnormal spacing ``2^s``: a normal result is within half
    an ulp, ``2^-p·|x|``, and a subnormal one within ``2^(s-1)``, so ``|x̂ - x| ≤ max(2^-p·|x|, 2^(s-1))``.
    """

    dtype: ClassVar[torch.dtype]
    unit_roundoff: ClassVar[float]
    subnormal_half_spacing: ClassVar[float]

    def __init__(self) -> None:
        super().__init__()
        self.block_size = None
        self._itemsize = torch.empty((), dtype=self.dtype).element_size()

    def encoded_nbytes(self, numel: int) -> int:
        return self._itemsize * _check_numel(numel)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        ax = x.detach().reshape(-1).double().abs()
        return torch.clamp(ax * self.unit_roundoff, min=self.subnormal_half_spacing)

    def _encode(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.numel():
            # One reduction and one sync: max |x| is NaN / Inf iff some value is, and (rounding being monotonic)
            # the cast overflows iff the cast of max |x| does.
            peak = flat.abs().amax()
            if not bool(torch.isfinite(peak.to(self.dtype))):
                if not bool(torch.isfinite(peak)):
                    self._reject_nonfinite(flat)
                bad = int((~torch.isfinite(flat.to(self.dtype))).sum())
                limit = torch.finfo(self.dtype).max
                raise ValueError(
                    f"{self.name} codec: {bad} finite values lie beyond the {self.name} range (|x| > {limit:.6g}) "
                    f"and would be sent as Inf; use a scaled codec (fp8, int8, fp4) or bf16"
                )
        return flat.to(self.dtype, copy=True).view(torch.uint8)

    def _decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return _bytes_as(payload, self.dtype).to(torch.float32, copy=True)

    def _nonfinite_payload(self, numel: int, device: torch.device) -> torch.Tensor:
        return torch.full((numel,), float("nan"), dtype=self.dtype, device=device).view(torch.uint8)


class NoneCodec(_CastCodec):
    """fp32 verbatim: ``4·n`` bytes, exact (error 0). Used for comparisons; ``make_reducer('none')`` all-reduces
    fp32 instead."""

    name = "none"
    bits_per_value = 32
    dtype = torch.float32
    unit_roundoff = 0.0
    subnormal_half_spacing = 0.0


class BF16Codec(_CastCodec):
    """bfloat16 (8 significant bits, fp32's exponent range): ``2·n`` bytes, ``|x̂ - x| ≤ max(2⁻⁸·|x|, 2⁻¹³⁴)``.
    Values beyond bf16's largest finite (≈ ±3.3895e38, i.e. those that would round to Inf) are rejected."""

    name = "bf16"
    bits_per_value = 16
    dtype = torch.bfloat16
    unit_roundoff = 2.0**-8
    subnormal_half_spacing = 2.0**-134


class FP16Codec(_CastCodec):
    """IEEE half (11 significant bits, normal range down to 2⁻¹⁴): ``2·n`` bytes,
    ``|x̂ - x| ≤ max(2⁻¹¹·|x|, 2⁻²⁵)``: values below 2⁻²⁵ flush to zero, which hurts small outer gradients
    (bf16 or a scaled codec keep them). Values with |x| ≥ 65520 (which would round to Inf) are rejected."""

    name = "fp16"
    bits_per_value = 16
    dtype = torch.float16
    unit_roundoff = 2.0**-11
    subnormal_half_spacing = 2.0**-25


# ---------------------------------------------------------------------------------------------------------------
# Block-scaled codecs


class _BlockCodec(Codec):
    """Shared machinery of the block codecs: see the module docstring for the layout and the normalisation.

    A subclass provides ``_quantize(u) -> uint8 codes`` for the normalised values ``u = x / a`` (shape ``(nb, B)``),
    ``_dequantize(code bytes) -> fp32 values relative to a`` (at least ``n`` of them, in order), and
    ``_code_nbytes(n)``.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{self.name} codec: block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size

    def num_blocks(self, numel: int) -> int:
        return -(-_check_numel(numel) // self.block_size)

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * self.num_blocks(numel) + self._code_nbytes(_check_numel(numel))

    def block_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element absmax of its block, ``a``, as float64 (for :meth:`error_bound`)."""
        flat = x.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        nb = self.num_blocks(n)
        absmax = F.pad(flat, (0, nb * self.block_size - n)).view(nb, self.block_size).abs().amax(dim=1)
        return absmax.double().repeat_interleave(self.block_size)[:n]

    def _encode(self, flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel()
        nb = self.num_blocks(n)
        blocks = F.pad(flat, (0, nb * self.block_size - n)).view(nb, self.block_size)
        absmax = blocks.abs().amax(dim=1)  # NaN propagates, so a finite absmax means a finite block
        if not bool(torch.isfinite(absmax).all()):
            self._reject_nonfinite(flat)
        divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # zero block: u = 0, no 0/0
        u = blocks / divisor.unsqueeze(1)
        codes = self._quantize(u)
        return torch.cat((absmax.view(torch.uint8), codes.reshape(-1)[: self._code_nbytes(n)]))

    def _decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nb = self.num_blocks(numel)
        absmax = _bytes_as(payload[: 4 * nb], torch.float32)
        values = self._dequantize(payload[4 * nb :])[:numel]
        padded = F.pad(values, (0, nb * self.block_size - numel)) if nb * self.block_size != numel else values
        padded.view(nb, self.block_size).mul_(absmax.unsqueeze(1))
        return padded[:numel]

    def _nonfinite_payload(self, numel: int, device: torch.device) -> torch.Tensor:
        # NaN scales: every decoded value is code · NaN = NaN, whatever the (zero) codes mean.
        scales = torch.full((self.num_blocks(numel),), float("nan"), dtype=torch.float32, device=device)
        codes = torch.zeros(self._code_nbytes(numel), dtype=torch.uint8, device=device)
        return torch.cat((scales.view(torch.uint8), codes))

    @abc.abstractmethod
    def _quantize(self, u: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _code_nbytes(self, numel: int) -> int: ...


class FP8Codec(_BlockCodec):
    """fp8 e4m3fn with a per-block fp32 scale: the block absmax ``a`` maps to 448 (e4m3fn's largest finite).

    Code = ``float8_e4m3fn(448·u)`` (torch's cast: round to nearest even), ``u = x / a``. Decode:
    ``x̂ = (float(code) / 448) · a``. Payload ``4·nb + n`` bytes (≈ 1.03·n for B = 128).

    Error bound: ``|x̂ - x| ≤ 2⁻⁴·|x| + 2⁻¹⁸·a + 2⁻¹⁴⁹``. Proof: with ``y = 448·u`` (two fp32 roundings,
    ``|y - 448x/a| ≤ 2⁻²³·448|x|/a``), e4m3 (4 significant bits, normal from 2⁻⁶, subnormal spacing 2⁻⁹) gives
    ``|q - y| ≤ 2⁻⁴·|y| + 2⁻¹⁰``; the two fp32 roundings of the decode add ``2⁻²³·a``, one more subnormal rounding
    ``2⁻¹⁵⁰``. In x units: ``2⁻⁴|x| + (2⁻¹⁰/448 + 2⁻²¹)·a + 2⁻¹⁵⁰``, and ``2⁻¹⁰/448 + 2⁻²¹ < 2⁻¹⁸``. So values
    above ``2⁻⁶·a/448`` keep 4 significant bits; smaller ones are resolved to ``≈ 2⁻¹⁸·a``.

    Needs ``torch.float8_e4m3fn`` (torch ≥ 2.1); construction raises :class:`RuntimeError` without it.
    """

    name = "fp8"
    bits_per_value = 8

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError(
                f"codec 'fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks (torch >= 2.1 has "
                f"it); pick another codec (int8 has the same size)"
            )
        super().__init__(block_size)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        ax = x.detach().reshape(-1).double().abs()
        return ax * 2.0**-4 + self.block_absmax(x) * 2.0**-18 + 2.0**-149

    def _code_nbytes(self, numel: int) -> int:
        return numel

    def _quantize(self, u: torch.Tensor) -> torch.Tensor:
        # |u| <= 1, so |448·u| <= 448 exactly (rounding is monotonic): no value can reach e4m3fn's NaN codes.
        return (u * 448.0).to(torch.float8_e4m3fn).view(torch.uint8)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.float8_e4m3fn).to(torch.float32).div_(448.0)


class Int8Codec(_BlockCodec):
    """Symmetric int8 with a per-block fp32 absmax scale: ``q = round(127·u) ∈ [-127, 127]`` (round half to even;
    -128 is never produced), ``u = x / a``. Decode: ``x̂ = (q / 127) · a``. Payload ``4·nb + n`` bytes.

    Error bound: ``|x̂ - x| ≤ a·(1/254 + 2⁻²⁰) + 2⁻¹⁴⁹`` (half a step of ``a/127``, plus four fp32 roundings of at
    most ``2⁻²⁴`` relative each, plus a subnormal rounding). Values below ``a/254`` flush to zero.
    """

    name = "int8"
    bits_per_value = 8

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_absmax(x) * (1.0 / 254.0 + 2.0**-20) + 2.0**-149

    def _code_nbytes(self, numel: int) -> int:
        return numel

    def _quantize(self, u: torch.Tensor) -> torch.Tensor:
        return torch.round(u * 127.0).to(torch.int8).view(torch.uint8)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.int8).to(torch.float32).div_(127.0)


class FP4Codec(_BlockCodec):
    """4-bit E3M0 with a per-block fp32 scale ``a`` = block absmax, two codes per byte.

    Code ``c = 8·s + e`` (4 bits): sign bit ``s`` (bit 3; 1 = negative) and exponent field ``e`` (bits 0-2), no
    mantissa. Value = ``(-1)^s · m_e · a`` with ``m_0 = 0`` and ``m_e = 2^(e-7)`` for ``e = 1..7``: the magnitudes
    are ``a`` times 0, 2⁻⁶, 2⁻⁵, 2⁻⁴, 2⁻³, 2⁻², 2⁻¹, 1 (:data:`FP4_MAGNITUDES`). Zero always encodes as code 0;
    code 8 (-0) is never produced and decodes to +0.0.

    Rounding: to the nearest magnitude in the *linear* domain (it minimises the absolute error, which is what adds
    up in a sum over workers): ``|u|`` rounds up from ``2^k`` to ``2^(k+1)`` at ``1.5·2^k`` and from 0 to 2⁻⁶ at
    2⁻⁷ (ties go to the larger magnitude); the block maximum (``|u| = 1``) is exact. Deterministic, not unbiased.

    Error bound: ``|x̂ - x| ≤ max(|x|/3, a/128)·(1 + 2⁻²⁰) + 2⁻¹⁴⁹``. Between ``2^k·a`` and ``2^(k+1)·a`` the worst
    case is the midpoint ``1.5·2^k·a``, off by a third of itself; below ``2⁻⁶·a`` values are off by at most
    ``2⁻⁷·a`` (they flush to zero below ``a/128``). The factor covers the fp32 rounding of ``u``; the decode
    ``m_e·a`` is exact (a power of two times ``a``) unless it lands among fp32's subnormals.

    Packing: value ``2i`` in the low nibble of code byte ``i``, value ``2i+1`` in the high nibble
    (:func:`pack_nibbles`). Payload ``4·nb + ceil(n/2)`` bytes: 0.53125·n for B = 128, 1/7.53 of fp32.
    """

    name = "fp4"
    bits_per_value = 4

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        ax = x.detach().reshape(-1).double().abs()
        return torch.maximum(ax / 3.0, self.block_absmax(x) / 128.0) * (1.0 + 2.0**-20) + 2.0**-149

    def _code_nbytes(self, numel: int) -> int:
        return (numel + 1) // 2

    def _quantize(self, u: torch.Tensor) -> torch.Tensor:
        # Nearest power of two, ties up, from the IEEE bits of |u| (<= 1): adding half the mantissa range
        # (0x400000) carries into the exponent exactly when the mantissa is >= 1.5, i.e. at the midpoint 1.5·2^k.
        # The biased exponent of 2^(e-7) is e + 120, so e = (biased exponent - 120) clamped to 0..7 (one add
        # folds both offsets; a negative sum shifts to a negative e, clamped to 0). [2⁻⁷, 1.5·2⁻⁷) must go up to
        # 2⁻⁶ (the midpoint of 0 and 2⁻⁶ is 2⁻⁷), hence the maximum with 1 there. A code is negative iff
        # u <= -2⁻⁷ (zero and the values that flush to it are always code 0, never -0). Same result as bucketing
        # |u| by FP4_THRESHOLDS (tested), in fewer passes over the data.
        bits = u.view(torch.int32)
        magnitude = bits & 0x7FFFFFFF
        nonzero = (magnitude >= (120 << 23)).view(torch.uint8)
        exponent = magnitude.add_(0x400000 - (120 << 23)).bitwise_right_shift_(23).clamp_(0, 7).to(torch.uint8)
        exponent = torch.maximum(exponent, nonzero)
        negative = (u <= -(2.0**-7)).view(torch.uint8)
        return pack_nibbles(exponent.bitwise_or_(negative.bitwise_left_shift_(3)))

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(block_size)
        self._tables: dict[str, torch.Tensor] = {}

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        # One gather through a (256, 2) table: a byte's two values (low nibble first), unpacked and decoded at once.
        key = str(codes.device)
        table = self._tables.get(key)
        if table is None:
            values = torch.tensor(FP4_CODE_VALUES, dtype=torch.float32)
            byte = torch.arange(256)
            table = self._tables[key] = torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=1).to(codes.device)
        return torch.index_select(table, 0, codes.to(torch.int32)).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Registry


CODEC_CLASSES: dict[str, type[Codec]] = {
    cls.name: cls for cls in (NoneCodec, BF16Codec, FP16Codec, FP8Codec, Int8Codec, FP4Codec)
}
CODECS: tuple[str, ...] = tuple(CODEC_CLASSES)
"""Codec names, from widest to narrowest: none, bf16, fp16, fp8, int8, fp4."""


def get_codec(name: str, block_size: int = DEFAULT_BLOCK_SIZE, *, device: torch.device | str | None = None) -> Codec:
    """The codec called ``name``, with ``block_size`` values per scale for the block codecs (ignored by the casts).

    With ``device``, also check now that the codec runs there (:meth:`Codec.check_device`); otherwise the check
    happens at the first encode on each device.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or bad block size.
        RuntimeError: the codec cannot run with this torch build or on ``device``.
    """
    cls = CODEC_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
    if issubclass(cls, _BlockCodec):
        codec: Codec = cls(block_size)
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{name} codec: block_size must be a positive int, got {block_size!r}")
        codec = cls()
    if device is not None:
        codec.check_device(device)
    return codec


def relative_rms_error(codec: Codec, x: torch.Tensor) -> float:
    """``‖decode(encode(x)) - x‖₂ / ‖x‖₂`` (0 for a zero tensor): the figure quoted in docs/compression.md."""
    flat = x.detach().reshape(-1).to(torch.float32)
    norm = float(flat.double().norm())
    if norm == 0.0:
        return 0.0
    return float((codec.roundtrip(flat).double() - flat.double()).norm()) / norm


__all__ = [
    "CODECS",
    "CODEC_CLASSES",
    "DEFAULT_BLOCK_SIZE",
    "FP4_CODE_VALUES",
    "FP4_MAGNITUDES",
    "FP4_THRESHOLDS",
    "BF16Codec",
    "Codec",
    "Encoded",
    "FP4Codec",
    "FP8Codec",
    "FP16Codec",
    "Int8Codec",
    "NoneCodec",
    "get_codec",
    "pack_nibbles",
    "relative_rms_error",
    "unpack_nibbles",
]
