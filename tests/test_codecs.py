"""Codecs for outer gradients: round-trip error within each codec's documented bound, exact sizes, rejection of
non-finite input, and bit-exact 4-bit packing."""

from __future__ import annotations

import math

import pytest
import torch

from eagerloco.compression import (
    CODECS,
    DEFAULT_BLOCK_SIZE,
    FP4_CODE_VALUES,
    FP4_MAGNITUDES,
    FP4_THRESHOLDS,
    Codec,
    get_codec,
    pack_nibbles,
    relative_rms_error,
    unpack_nibbles,
)

LOSSY = [name for name in CODECS if name != "none"]
BLOCK = ["fp8", "int8", "fp4"]
SIZES = [1, 2, 127, 128, 129, 1000, 4099]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=gen(seed)) * 1e-3


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    """Cauchy-like: ratio of normals, values from ~1e-6 to ~1e4."""
    g = gen(seed)
    return torch.randn(n, generator=g) / torch.randn(n, generator=g)


def wide_range(n: int, seed: int) -> torch.Tensor:
    """Log-normal magnitudes over ~16 decades, random signs."""
    g = gen(seed)
    return torch.randn(n, generator=g).sign() * torch.exp(torch.randn(n, generator=g) * 6.0)


def check_within_bound(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    encoded = codec.encode(x)
    assert encoded.payload.dtype == torch.uint8 and encoded.payload.dim() == 1
    assert encoded.payload.is_contiguous()
    assert encoded.nbytes == codec.encoded_nbytes(x.numel())
    decoded = codec.decode(encoded.payload, encoded.numel)
    assert decoded.dtype == torch.float32 and decoded.shape == (x.numel(),)
    assert bool(torch.isfinite(decoded).all())
    err = (decoded.double() - x.reshape(-1).double()).abs()
    bound = codec.error_bound(x)
    worst = int(torch.argmax(err - bound)) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{codec.name}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at x = {x.reshape(-1)[worst]:.3g}"
    )
    return decoded


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_unknown_codec() -> None:
    assert CODECS == ("none", "bf16", "fp16", "fp8", "int8", "fp4")
    for name in CODECS:
        assert get_codec(name).name == name
    with pytest.raises(ValueError, match=r"unknown codec 'fp3'.*none, bf16, fp16, fp8, int8, fp4"):
        get_codec("fp3")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            get_codec("fp4", block_size=bad)  # type: ignore[arg-type]


def test_fp8_without_float8_dtype_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        get_codec("fp8")


@pytest.mark.parametrize("name", LOSSY)
def test_device_that_cannot_run_the_codec_fails_loudly(name: str) -> None:
    # The meta device has no data: the probe round trip cannot be checked, so the codec refuses it.
    with pytest.raises(RuntimeError, match=f"codec '{name}' cannot run on device meta"):
        get_codec(name, device="meta")


# ---------------------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("block_size", [DEFAULT_BLOCK_SIZE, 32, 7])
def test_encoded_nbytes_formulas(block_size: int) -> None:
    for n in (0, 1, 2, 6, 7, 127, 128, 129, 1000):
        nb = math.ceil(n / block_size)
        expected = {
            "none": 4 * n,
            "bf16": 2 * n,
            "fp16": 2 * n,
            "fp8": 4 * nb + n,
            "int8": 4 * nb + n,
            "fp4": 4 * nb + (n + 1) // 2,
        }
        for name in CODECS:
            codec = get_codec(name, block_size)
            assert codec.encoded_nbytes(n) == expected[name], (name, n)
            x = torch.randn(n, generator=gen(n))
            assert codec.encode(x).nbytes == expected[name], (name, n)
    with pytest.raises(ValueError, match="numel"):
        get_codec("fp4").encoded_nbytes(-1)


def test_fp4_payload_is_an_eighth_of_fp32_plus_scales() -> None:
    n = 1 << 16
    codec = get_codec("fp4")
    nbytes = codec.encode(torch.randn(n, generator=gen(0))).nbytes
    assert nbytes == n // 2 + 4 * (n // DEFAULT_BLOCK_SIZE)
    ratio = nbytes / (4 * n)
    assert ratio == pytest.approx(1 / 8 + 1 / DEFAULT_BLOCK_SIZE)  # 0.1328 = 1/7.53
    assert ratio <= 1 / 6


# ---------------------------------------------------------------------------------------------------------------
# Round-trip error within the documented bound


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("make", [normal, heavy_tailed, wide_range], ids=["normal", "heavy", "wide"])
def test_roundtrip_within_bound(name: str, make) -> None:
    codec = get_codec(name)
    for seed, n in enumerate(SIZES):
        x = make(n, seed)
        if name == "fp16":
            x = x.clamp(-6e4, 6e4)  # beyond fp16's range it is rejected (tested below)
        check_within_bound(codec, x)


@pytest.mark.parametrize("name", BLOCK)
@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_roundtrip_other_block_sizes(name: str, block_size: int) -> None:
    codec = get_codec(name, block_size)
    for seed, n in enumerate((1, 13, 64, 65, 333)):
        check_within_bound(codec, wide_range(n, seed))


def test_bound_is_tight_and_errors_are_as_documented() -> None:
    """The bounds are worst cases, not loose envelopes: random data gets close to them. And the measured relative
    RMS errors quoted in docs/compression.md hold."""
    x = torch.randn(1 << 16, generator=gen(1))
    rms = {name: relative_rms_error(get_codec(name), x) for name in CODECS}
    assert rms["none"] == 0.0
    assert 1.0e-3 < rms["bf16"] < 2.5e-3
    assert 1.0e-4 < rms["fp16"] < 3.5e-4
    assert 0.015 < rms["fp8"] < 0.035
    assert 0.004 < rms["int8"] < 0.009
    assert 0.15 < rms["fp4"] < 0.23
    for name in LOSSY:
        codec = get_codec(name)
        ratio = ((codec.roundtrip(x).double() - x.double()).abs() / codec.error_bound(x)).max()
        assert 0.75 < float(ratio) <= 1.0, (name, float(ratio))


# ---------------------------------------------------------------------------------------------------------------
# Adversarial inputs


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", [1, 5, 128, 300])
def test_zeros_decode_to_exact_zeros(name: str, n: int) -> None:
    codec = get_codec(name)
    decoded = codec.roundtrip(torch.zeros(n))
    assert torch.equal(decoded, torch.zeros(n)) and not bool(torch.signbit(decoded).any())
    # A zero block among non-zero ones stays exactly zero too (no 0/0 in its scale).
    x = torch.randn(3 * DEFAULT_BLOCK_SIZE, generator=gen(n))
    x[DEFAULT_BLOCK_SIZE : 2 * DEFAULT_BLOCK_SIZE] = 0.0
    decoded = check_within_bound(codec, x)
    assert torch.equal(decoded[DEFAULT_BLOCK_SIZE : 2 * DEFAULT_BLOCK_SIZE], torch.zeros(DEFAULT_BLOCK_SIZE))


@pytest.mark.parametrize("name", ["bf16", *BLOCK])
def test_huge_value_among_tiny_ones(name: str) -> None:
    """One 1e30 among 1e-30s. Block codecs: the bound is relative to the block absmax, so the tiny values of that
    block flush to zero (fp4, int8, fp8 alike) while the huge one is exact and the next block, all tiny, keeps its
    precision. bf16 keeps every value to 2⁻⁸ relative."""
    b = DEFAULT_BLOCK_SIZE
    x = torch.full((2 * b + 5,), 1e-30)
    x[1::2] *= -1
    x[3] = 1e30
    decoded = check_within_bound(get_codec(name), x)
    if name == "bf16":
        torch.testing.assert_close(decoded, x, rtol=2**-8, atol=0)
    else:
        assert decoded[3] == x[3]  # the block maximum is always exact
        assert torch.equal(decoded[:b][torch.arange(b) != 3], torch.zeros(b - 1))
        # the neighbouring block's maximum is 1e-30 itself: its values come back exactly (±absmax)
        assert torch.equal(decoded[b:], x[b:])


def test_fp16_rejects_values_beyond_its_range_and_flushes_tiny_ones() -> None:
    codec = get_codec("fp16")
    x = torch.tensor([1.0, 65504.0, -65519.0, 1e-9, 3e-8])
    decoded = check_within_bound(codec, x)
    assert decoded[3] == 0.0  # below 2⁻²⁵: flushed, within the absolute bound
    for big in (65520.0, -1e5, 1e30):
        with pytest.raises(ValueError, match=r"fp16 codec: 1 finite values lie beyond the fp16 range"):
            codec.encode(torch.tensor([0.5, big]))


def test_bf16_rejects_values_that_would_round_to_inf() -> None:
    with pytest.raises(ValueError, match=r"bf16 codec: 2 finite values lie beyond"):
        get_codec("bf16").encode(torch.tensor([3.4e38, 1.0, -3.4e38]))


@pytest.mark.parametrize("name", BLOCK)
def test_block_codecs_cover_the_whole_fp32_range(name: str) -> None:
    """Largest finite and subnormal fp32 values: no overflow or underflow of any intermediate."""
    fmax = torch.finfo(torch.float32).max
    tiny = torch.finfo(torch.float32).smallest_normal
    x = torch.tensor([fmax, -fmax, 1.0, 1e-38, 1e-45, -3e-39, 7e-42, tiny] * 3)
    codec = get_codec(name, block_size=8)
    decoded = check_within_bound(codec, x)
    assert decoded[0] == fmax and decoded[1] == -fmax
    sub = torch.tensor([1e-45, -3e-39, 7e-42, 2e-40, -1e-44])  # a block of subnormals only
    check_within_bound(codec, sub)


@pytest.mark.parametrize("name", CODECS)
def test_nonfinite_input_is_rejected(name: str) -> None:
    codec = get_codec(name)
    x = torch.randn(300, generator=gen(5))
    x[[3, 200]] = float("nan")
    x[150] = float("inf")
    with pytest.raises(ValueError, match=rf"{name} codec: refusing to encode 3 non-finite values \(2 NaN, 1 Inf\)"):
        codec.encode(x)
    with pytest.raises(ValueError, match=rf"{name} codec: refusing to encode 1 non-finite values \(0 NaN, 1 Inf\)"):
        codec.encode(torch.tensor([-float("inf")]))


@pytest.mark.parametrize("name", CODECS)
def test_input_checks_and_no_aliasing(name: str) -> None:
    codec = get_codec(name)
    with pytest.raises(TypeError, match="fp32"):
        codec.encode(torch.ones(4, dtype=torch.float64))
    x = torch.randn(6, 50, generator=gen(9))
    encoded = codec.encode(x.t())  # any shape and layout, read flat in row-major order of the given view
    expected = codec.roundtrip(x.t().contiguous().reshape(-1))
    before = encoded.payload.clone()
    x.add_(1.0)  # the payload is a buffer of its own
    assert torch.equal(encoded.payload, before)
    assert torch.equal(codec.decode(encoded.payload, 300), expected)
    assert torch.equal(codec.encode(x).payload, codec.encode(x.clone()).payload)  # deterministic
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(encoded.payload[:-1], 300)
    with pytest.raises(ValueError, match="uint8"):
        codec.decode(encoded.payload.to(torch.int16), 300)


@pytest.mark.parametrize("name", CODECS)
def test_empty_tensor(name: str) -> None:
    codec = get_codec(name)
    encoded = codec.encode(torch.empty(0))
    assert encoded.nbytes == 0
    assert codec.decode(encoded.payload, 0).shape == (0,)


@pytest.mark.parametrize("name", CODECS)
def test_decode_rows_of_a_gathered_buffer_at_unaligned_offsets(name: str) -> None:
    """All-gather output rows start at r·E bytes; E may be odd, so scales may sit at unaligned offsets."""
    codec = get_codec(name)
    n = 129 if name != "none" else 1  # fp4 E = 8 + 65 = 73, fp8/int8 E = 137: odd
    xs = [torch.randn(n, generator=gen(r)) for r in range(3)]
    gathered = torch.stack([codec.encode(x).payload for x in xs])
    for r, x in enumerate(xs):
        assert torch.equal(codec.decode(gathered[r], n), codec.roundtrip(x))


# ---------------------------------------------------------------------------------------------------------------
# fp4 (E3M0) codes and packing


def test_fp4_code_table() -> None:
    assert FP4_MAGNITUDES == (0.0, 2**-6, 2**-5, 2**-4, 2**-3, 2**-2, 2**-1, 1.0)
    assert FP4_CODE_VALUES[:8] == FP4_MAGNITUDES
    assert FP4_CODE_VALUES[8] == 0.0 and math.copysign(1.0, FP4_CODE_VALUES[8]) == 1.0  # -0 decodes to +0
    assert FP4_CODE_VALUES[9:] == tuple(-m for m in FP4_MAGNITUDES[1:])


def test_fp4_pack_unpack_exact_over_all_codes() -> None:
    every_byte = torch.arange(256, dtype=torch.uint8)
    codes = unpack_nibbles(every_byte, 512)
    assert torch.equal(codes[0::2], every_byte & 0x0F) and torch.equal(codes[1::2], every_byte >> 4)
    assert torch.equal(pack_nibbles(codes), every_byte)
    # all 16 x 16 ordered pairs of codes, plus an odd count (padded with a zero code)
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16)).reshape(-1).to(torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(pairs), pairs.numel()), pairs)
    odd = torch.arange(16, dtype=torch.uint8)[:15]
    packed = pack_nibbles(odd)
    assert packed.numel() == 8 and int(packed[-1]) == 14  # high nibble of the last byte is the zero pad
    assert torch.equal(unpack_nibbles(packed, 15), odd)


def test_fp4_every_code_decodes_and_reencodes_exactly() -> None:
    """A block holding every representable value (scaled by a = 3.0) round-trips bit-exactly, each value to the
    code the docstring defines, and the payload's code bytes are those codes packed."""
    codec = get_codec("fp4", block_size=16)
    a = 3.0
    codes = torch.tensor([7, 1, 2, 3, 4, 5, 6, 0, 15, 9, 10, 11, 12, 13, 14, 0], dtype=torch.uint8)
    x = torch.tensor([FP4_CODE_VALUES[c] for c in codes.tolist()]) * a
    encoded = codec.encode(x)
    assert torch.equal(encoded.payload[:4].view(torch.float32), torch.tensor([a]))
    assert torch.equal(encoded.payload[4:], pack_nibbles(codes))
    assert torch.equal(codec.decode(encoded.payload, 16), x)
    # and a payload holding every one of the 16 codes (code 8 included) decodes to the table
    table = torch.tensor(FP4_CODE_VALUES) * a
    payload = torch.cat([torch.tensor([a]).view(torch.uint8), pack_nibbles(torch.arange(16, dtype=torch.uint8))])
    assert torch.equal(codec.decode(payload, 16), table)


def test_fp4_rounds_to_nearest_in_the_linear_domain() -> None:
    codec = get_codec("fp4", block_size=1024)

    def below(v: float) -> float:  # the next fp32 value towards zero
        return float(torch.nextafter(torch.tensor(v), torch.tensor(0.0)))

    u = [1.0, 0.75, below(0.75), 0.375, below(0.375), 1.5 * 2**-6, below(1.5 * 2**-6), 2**-7, below(2**-7), 1e-6]
    expected = [1.0, 1.0, 0.5, 0.5, 0.25, 2**-5, 2**-6, 2**-6, 0.0, 0.0]
    x = torch.tensor(u + [-v for v in u[1:]])
    decoded = codec.roundtrip(x)
    assert decoded.tolist() == expected + [-v if v else 0.0 for v in expected[1:]]
    assert not bool(torch.signbit(decoded).logical_and(decoded == 0).any())  # zeros come back as +0


def test_fp4_codes_match_bucketing_by_the_documented_thresholds() -> None:
    """The encoder's bit arithmetic equals bucketing |u| by the midpoints, on random magnitudes over 30 binades
    and on every midpoint and its two fp32 neighbours."""
    g = gen(11)
    u = torch.rand(1 << 16, generator=g) * torch.exp2(-30 * torch.rand(1 << 16, generator=g))
    t = torch.tensor(FP4_THRESHOLDS)
    edges = torch.cat([t, torch.nextafter(t, torch.zeros_like(t)), torch.nextafter(t, torch.ones_like(t))])
    u = torch.cat([torch.tensor([1.0, 0.0]), u, edges])
    u = torch.cat([u, -u])
    x = torch.cat([torch.tensor([1.0]), u])  # block absmax 1: u is what the encoder sees
    codec = get_codec("fp4", block_size=x.numel())
    codes = unpack_nibbles(codec.encode(x).payload[4:], x.numel())[1:]
    exponent = torch.bucketize(u.abs(), t, right=True)
    expected = exponent + 8 * ((u < 0) & (exponent > 0))
    assert torch.equal(codes.long(), expected)


# ---------------------------------------------------------------------------------------------------------------
# GPU: same bytes as on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", CODECS)
def test_cuda_payload_is_bit_identical_to_cpu(name: str) -> None:
    codec = get_codec(name, device="cuda")
    for seed, n in enumerate((1, 129, 100_003)):
        x = wide_range(n, seed).clamp(-6e4, 6e4)
        cpu = codec.encode(x).payload
        gpu = codec.encode(x.cuda()).payload
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
        assert torch.equal(codec.decode(gpu, n).cpu(), codec.decode(cpu, n))


@pytest.mark.parametrize("name", CODECS)
def test_nonfinite_payload_decodes_to_nan(name: str) -> None:
    # What a worker sends in place of a non-finite outer gradient: the right size, and NaN for every value.
    codec = get_codec(name)
    for numel in (1, 127, 300):
        payload = codec.nonfinite_payload(numel)
        assert payload.dtype == torch.uint8 and payload.numel() == codec.encoded_nbytes(numel)
        decoded = codec.decode(payload, numel)
        assert decoded.shape == (numel,) and bool(torch.isnan(decoded).all())
