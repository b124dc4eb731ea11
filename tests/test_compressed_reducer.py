"""The compressed reducer: the average is the mean of the decoded contributions, bit-identical on every worker,
the bytes handed to the collective are the encoded ones, error feedback carries the residual; and the same holds
with 2 and 3 real gloo processes on localhost.

Also a worker script: ``python test_compressed_reducer.py RANK WORLD PORT OUT`` runs :func:`scenario` in a gloo
process group and saves what it saw (used by the multi-process test).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from _toy import launch_ranks
from eagerloco.comm import Communicator, InProcessGroup, MeanReducer, run_workers, wire_bytes
from eagerloco.compression import CODECS, CompressedReducer, get_codec, make_reducer

N = 3001  # not a multiple of any block size used here
EF_STEPS = 3
BLOCK_SIZE = 64


def contribution(rank: int, index: int, n: int = N) -> torch.Tensor:
    """Worker ``rank``'s outer gradient number ``index``: deterministic, heavy-ish tails, within fp16's range."""
    g = torch.Generator().manual_seed(1000 * rank + index)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g)) * 1e-2


def scenario(comm: Communicator) -> dict[str, Any]:
    """Every codec once (make_reducer, as the engine does), then fp4 with error feedback for a few steps. Records
    the averages, the bytes, and the contributions as sent (after error feedback)."""
    out: dict[str, Any] = {}
    for index, name in enumerate(CODECS):
        reducer = make_reducer(name, comm, block_size=BLOCK_SIZE)
        delta = contribution(comm.rank, index)
        before = (comm.stats.payload_bytes, comm.stats.wire_bytes, comm.stats.collectives)
        pending = reducer.launch(delta)
        mean = pending.wait(60)
        out[name] = {
            "mean": mean.clone(),
            "pending_bytes": pending.payload_bytes,
            "payload_bytes": comm.stats.payload_bytes - before[0],
            "wire_bytes": comm.stats.wire_bytes - before[1],
            "collectives": comm.stats.collectives - before[2],
        }
    reducer = make_reducer("fp4", comm, error_feedback=True, block_size=BLOCK_SIZE)
    sent, means = [], []
    for step in range(EF_STEPS):
        delta = contribution(comm.rank, 100 + step)
        pending = reducer.launch(delta)
        sent.append(delta.clone())  # the contribution before encoding, residual included
        means.append(pending.wait(60).clone())
    out["fp4_ef"] = {"sent": sent, "means": means, "residual": reducer.state_dict()["residual"]}
    return out


def run_inprocess(world_size: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    return run_workers(InProcessGroup(world_size, timeout=60), scenario, join_timeout=120)


def reference_mean(name: str, contributions: list[torch.Tensor]) -> torch.Tensor:
    """(Σ_r decode(encode(x_r))) / M, summed in rank order in fp32."""
    codec = get_codec(name, BLOCK_SIZE)
    total = codec.roundtrip(contributions[0])
    for x in contributions[1:]:
        total.add_(codec.roundtrip(x))
    return total.div_(len(contributions))


# ---------------------------------------------------------------------------------------------------------------
# In-process threads


@pytest.fixture(scope="module")
def inprocess_results() -> dict[int, list[dict[str, Any]]]:
    return {m: run_inprocess(m) for m in (1, 2, 3)}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_mean_of_decoded_contributions_bit_identical_on_every_worker(world_size, inprocess_results) -> None:
    results = inprocess_results[world_size]
    for index, name in enumerate(CODECS):
        contributions = [contribution(r, index) for r in range(world_size)]
        expected = reference_mean(name, contributions)
        exact_mean = torch.stack(contributions).double().mean(0)
        sum_rounding = 2.0**-22 * torch.stack(contributions).double().abs().sum(0)  # fp32 sum of M terms
        bound = torch.stack([get_codec(name, BLOCK_SIZE).error_bound(x) for x in contributions]).mean(0)
        for rank in range(world_size):
            mean = results[rank][name]["mean"]
            assert mean.dtype == torch.float32 and mean.shape == (N,)
            assert torch.equal(mean, results[0][name]["mean"]), (name, rank)
            if name == "none":  # fp32 all-reduce: the same rank-order sum
                torch.testing.assert_close(mean, expected, rtol=0, atol=0)
            else:
                assert torch.equal(mean, expected), (name, rank)
            # and within the codec's bound of the exact mean (plus fp32 rounding of the sum)
            assert bool(((mean.double() - exact_mean).abs() <= bound + sum_rounding).all()), (name, rank)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_bytes_handed_to_collectives_are_the_encoded_ones(world_size, inprocess_results) -> None:
    for rank in range(world_size):
        record = inprocess_results[world_size][rank]
        for name in CODECS:
            nbytes = get_codec(name, BLOCK_SIZE).encoded_nbytes(N)
            kind = "all_reduce" if name == "none" else "all_gather"
            assert record[name]["collectives"] == 1, name  # ONE collective per average
            assert record[name]["pending_bytes"] == record[name]["payload_bytes"] == nbytes, name
            assert record[name]["wire_bytes"] == wire_bytes(kind, nbytes, world_size), name
        assert record["fp4"]["payload_bytes"] <= record["none"]["payload_bytes"] / 6


def test_make_reducer_choices() -> None:
    comm = InProcessGroup(1).communicator(0)
    assert isinstance(make_reducer("none", comm), MeanReducer)
    for name in CODECS[1:]:
        reducer = make_reducer(name, comm, error_feedback=True, block_size=32)
        assert isinstance(reducer, CompressedReducer) and reducer.name == name
        assert reducer.codec.block_size == (32 if name in ("fp8", "int8", "fp4") else None)
        assert reducer.error_feedback
    with pytest.raises(ValueError, match="valid codecs: none, bf16, fp16, fp8, int8, fp4"):
        make_reducer("e2m1", comm)
    with pytest.raises(ValueError, match="no residual"):
        make_reducer("none", comm, error_feedback=True)
    with pytest.raises(RuntimeError, match="cannot run on device meta"):
        make_reducer("fp4", comm, device="meta")


def test_delta_is_neither_read_nor_written_after_launch() -> None:
    group = InProcessGroup(2, timeout=30)

    def worker(comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        reducer = CompressedReducer(comm, get_codec("int8"))
        delta = contribution(comm.rank, 7)
        original = delta.clone()
        pending = reducer.launch(delta)
        assert torch.equal(delta, original)  # without error feedback, launch leaves delta alone
        delta.mul_(1 / 2).add_(5.0)  # eager mode scales its copy while the average is in flight
        first = pending.wait()
        assert pending.is_completed() and pending.wait() is first  # idempotent
        return first, original

    results = run_workers(group, worker, join_timeout=60)
    codec = get_codec("int8")
    expected = (codec.roundtrip(results[0][1]) + codec.roundtrip(results[1][1])) / 2
    for mean, _ in results:
        assert torch.equal(mean, expected)


def test_launch_rejects_non_flat_or_non_fp32() -> None:
    reducer = CompressedReducer(InProcessGroup(1).communicator(0), "fp4")
    with pytest.raises(TypeError, match="flat fp32"):
        reducer.launch(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="flat fp32"):
        reducer.launch(torch.zeros(4, dtype=torch.bfloat16))
    delta = torch.ones(8)
    delta[2] = float("nan")
    # The codec refuses NaN, but the collective still happens: a payload that decodes to NaN everywhere, so every
    # worker's average is NaN and the engine's nonfinite policy decides the same on all of them.
    mean = reducer.launch(delta).wait()
    assert mean.shape == (8,) and bool(torch.isnan(mean).all())


# ---------------------------------------------------------------------------------------------------------------
# Error feedback


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_error_feedback_carries_the_residual(world_size, inprocess_results) -> None:
    codec = get_codec("fp4", BLOCK_SIZE)
    for rank in range(world_size):
        ef = inprocess_results[world_size][rank]["fp4_ef"]
        residual = torch.zeros(N)
        for step in range(EF_STEPS):
            raw = contribution(rank, 100 + step)
            # launch added the carried residual into delta, in place, before encoding
            assert torch.equal(ef["sent"][step], raw + residual), step
            residual = ef["sent"][step] - codec.roundtrip(ef["sent"][step])
        assert torch.equal(ef["residual"], residual)
        # telescoping: what was sent decoded, plus what is still carried, is what the worker produced
        decoded_sum = sum(codec.roundtrip(s).double() for s in ef["sent"])
        raw_sum = sum(contribution(rank, 100 + s).double() for s in range(EF_STEPS))
        torch.testing.assert_close(decoded_sum + ef["residual"].double(), raw_sum, rtol=1e-5, atol=1e-7)
    for step in range(EF_STEPS):
        sent = [inprocess_results[world_size][r]["fp4_ef"]["sent"][step] for r in range(world_size)]
        for rank in range(world_size):
            assert torch.equal(
                inprocess_results[world_size][rank]["fp4_ef"]["means"][step], reference_mean("fp4", sent)
            )


def test_error_feedback_shrinks_the_accumulated_error() -> None:
    """Summed over many steps, the error of what was applied stays bounded by one residual with error feedback,
    and grows without it."""
    comm = InProcessGroup(1).communicator(0)
    with_ef, without = (CompressedReducer(comm, get_codec("fp4"), error_feedback=ef) for ef in (True, False))
    applied = {True: torch.zeros(512, dtype=torch.float64), False: torch.zeros(512, dtype=torch.float64)}
    truth = torch.zeros(512, dtype=torch.float64)
    for step in range(40):
        raw = contribution(0, 500 + step, 512)
        truth += raw.double()
        applied[True] += with_ef.launch(raw.clone()).wait().double()
        applied[False] += without.launch(raw.clone()).wait().double()
    err_ef = float((applied[True] - truth).norm())
    err_plain = float((applied[False] - truth).norm())
    assert err_ef < 0.5 * err_plain
    torch.testing.assert_close(applied[True] + with_ef.residual.double(), truth, rtol=1e-5, atol=1e-6)


def test_error_feedback_state_dict_roundtrip() -> None:
    comm = InProcessGroup(1).communicator(0)
    a = CompressedReducer(comm, get_codec("int8", 16), error_feedback=True)
    assert a.state_dict()["residual"] is None
    a.launch(contribution(0, 1, 100)).wait()
    state = a.state_dict()
    b = CompressedReducer(comm, get_codec("int8", 16), error_feedback=True)
    b.load_state_dict(state)
    assert torch.equal(b.residual, a.residual) and b.residual is not a.residual
    x = contribution(0, 2, 100)
    xa, xb = x.clone(), x.clone()
    assert torch.equal(a.launch(xa).wait(), b.launch(xb).wait())
    assert torch.equal(xa, xb) and torch.equal(a.residual, b.residual)
    with pytest.raises(ValueError, match="codec 'int8' \\(block size 16\\), this reducer uses 'fp4'"):
        CompressedReducer(comm, "fp4", error_feedback=True).load_state_dict(state)
    with pytest.raises(ValueError, match="error_feedback=False"):
        CompressedReducer(comm, get_codec("int8", 16)).load_state_dict(state)
    with pytest.raises(ValueError, match="one CompressedReducer per fragment"):
        b.launch(torch.zeros(99))


# ---------------------------------------------------------------------------------------------------------------
# Real processes: gloo on localhost


def launch_gloo(world_size: int, tmp_path: Path) -> list[dict[str, Any]]:
    return launch_ranks(__file__, world_size, tmp_path, timeout=120)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_processes_match_inprocess(world_size, tmp_path, inprocess_results) -> None:
    results = launch_gloo(world_size, tmp_path)
    reference = inprocess_results[world_size]
    for rank in range(world_size):
        for name in CODECS:
            got, want = results[rank][name], reference[rank][name]
            nbytes = get_codec(name, BLOCK_SIZE).encoded_nbytes(N)
            kind = "all_reduce" if name == "none" else "all_gather"
            assert got["collectives"] == 1
            assert got["pending_bytes"] == got["payload_bytes"] == nbytes, name
            assert got["wire_bytes"] == wire_bytes(kind, nbytes, world_size), name
            if name == "none" and world_size > 2:  # gloo's ring sums in another order than rank order
                torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-6, atol=1e-9)
            else:  # an all-gather moves bytes: decoding and summing in rank order gives the same bits
                assert torch.equal(got["mean"], want["mean"]), (name, rank)
            assert torch.equal(got["mean"], results[0][name]["mean"]), (name, rank)
        assert results[rank]["fp4"]["payload_bytes"] <= results[rank]["none"]["payload_bytes"] / 6
        for step in range(EF_STEPS):
            assert torch.equal(results[rank]["fp4_ef"]["means"][step], reference[rank]["fp4_ef"]["means"][step])
        assert torch.equal(results[rank]["fp4_ef"]["residual"], reference[rank]["fp4_ef"]["residual"])


def _worker_main(argv: list[str]) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from eagerloco.comm import TorchDistributedCommunicator

    rank, world_size, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.save(scenario(TorchDistributedCommunicator(timeout=60)), out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
