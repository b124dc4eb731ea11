"""Workers that are groups of ranks: 2 workers x 2 ranks over gloo on 127.0.0.1, DDP and FSDP2 inside each worker,
the outer step across workers rank by rank (``eagerloco.two_level_mesh``).

* the outer state (φ and the outer momentum) of rank n is bit-identical in every worker, as it is with one rank
  per worker (sync, overlap, delayed; eager after consolidate);
* the final outer parameters equal the one-rank-per-worker run on the same global data, within float
  tolerance (the inner gradients are averaged over 2 half-batches instead of computed on the whole batch);
* each rank sends only its share: the two ranks of a worker together send what one rank per worker sends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _layout_worker import CASES, CONSISTENCY_ONLY, PARALLEL, STEPS, train_case
from _toy import launch_ranks, run_inprocess

HERE = Path(__file__).parent
WORKERS, RANKS_PER_WORKER = 2, 2


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory) -> list[dict]:
    """Run every case once in 4 gloo processes (2 workers x 2 ranks); one result dict per global rank."""
    tmp = tmp_path_factory.mktemp("layout")
    return launch_ranks(HERE / "_layout_worker.py", WORKERS * RANKS_PER_WORKER, tmp, str(RANKS_PER_WORKER))


def test_mesh_groups_are_workers_and_shard_positions(layout_results):
    for rank, result in enumerate(layout_results):
        worker, inner = divmod(rank, RANKS_PER_WORKER)
        assert (result["worker"], result["inner_rank"]) == (worker, inner)
        assert result["inner_ranks"] == [worker * RANKS_PER_WORKER + n for n in range(RANKS_PER_WORKER)]
        assert result["outer_ranks"] == [m * RANKS_PER_WORKER + inner for m in range(WORKERS)]


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("case", [*CASES, *CONSISTENCY_ONLY])
def test_outer_state_is_consistent_across_workers(layout_results, parallel, case):
    key = f"{parallel}/{case}"
    uniform = not case.startswith("eager")  # eager's φ_m differ by design until consolidate
    for inner in range(RANKS_PER_WORKER):
        peers = [layout_results[m * RANKS_PER_WORKER + inner][key] for m in range(WORKERS)]
        if uniform:
            for other in peers[1:]:
                for a, b in zip(peers[0]["phi"], other["phi"]):
                    assert torch.equal(a, b), (key, inner)
                for a, b in zip(peers[0]["momentum"], other["momentum"]):
                    assert torch.equal(a, b), (key, inner)
    # after finalize and consolidate every rank of every worker holds the same model, in φ and in θ
    first = layout_results[0][key]
    for result in layout_results[1:]:
        for name, value in first["full"].items():
            assert torch.equal(value, result[key]["full"][name]), (key, name)
            assert torch.equal(value, result[key]["theta"][name]), (key, name)


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("case", list(CASES))
def test_result_equals_one_rank_per_worker_on_the_same_data(layout_results, parallel, case):
    config = CASES[case]
    reference = run_inprocess(WORKERS, lambda comm: train_case(comm, config, STEPS))
    key = f"{parallel}/{case}"
    for rank, result in enumerate(layout_results):
        got = result[key]["full"]
        expected = reference[0]["full"]
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{key} {name} {rank}")
    # Each rank sent only its share of the fragments: the ranks of a worker together sent one worker's bytes.
    for worker in range(WORKERS):
        ranks = range(worker * RANKS_PER_WORKER, (worker + 1) * RANKS_PER_WORKER)
        sent = sum(layout_results[r][key]["payload_bytes"] for r in ranks)
        assert sent == reference[worker]["payload_bytes"], (key, worker)
        assert all(layout_results[r][key]["payload_bytes"] < sent for r in ranks)
