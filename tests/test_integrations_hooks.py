"""Drop-in use: ``with DiLoCo(model, inner, config) as loco:`` steps the outer loop from the inner optimizer's
post-hook, bitwise like the explicit ``loco.step()`` API in every mode; misuse is refused; fragments by name."""

from __future__ import annotations

import pytest
import torch

from _toy import TinyNet, run_inprocess
from eagerloco import ConfigError, DiLoCo, DiLoCoConfig
from eagerloco.comm import InProcessGroup

CONFIGS = {
    "sync": DiLoCoConfig(mode="sync", sync_every=4, outer_momentum=0.9),
    "overlap_p2": DiLoCoConfig(mode="overlap", sync_every=4, num_fragments=2, overlap_steps=1, alpha=0.5),
    "delayed_k2": DiLoCoConfig(mode="delayed", sync_every=4, delay=2),
    "eager_k2_p2": DiLoCoConfig(mode="eager", sync_every=4, delay=2, num_fragments=2),
}
STEPS = 14


def _train(comm, config: DiLoCoConfig, hooked: bool) -> dict[str, torch.Tensor]:
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1000 + comm.rank)
    w = torch.randn(4, 1, generator=generator)

    def loop() -> None:  # the user's loop: no eagerloco call in it
        for _ in range(STEPS):
            x = torch.randn(16, 4, generator=generator)
            (model(x) - x @ w - 0.1 * comm.rank).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()

    loco = DiLoCo(model, inner, config, comm=comm)
    if hooked:
        with loco:
            loop()
        assert loco.finalized and loco.inner_step == STEPS
    else:
        for _ in range(STEPS):
            x = torch.randn(16, 4, generator=generator)
            (model(x) - x @ w - 0.1 * comm.rank).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()
            loco.step()
        loco.finalize()
        loco.consolidate()
    out = {f"theta.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"phi.{n}": v.clone() for n, v in loco.outer_parameters().items()})
    for core in loco.states:
        for key, value in core.outer_optimizer.state_dict()["state"].get(0, {}).items():
            out[f"outer.{core.index}.{key}"] = value.clone()
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_hook_api_is_bitwise_the_explicit_step_api(name):
    config = CONFIGS[name]
    explicit = run_inprocess(2, lambda comm: _train(comm, config, hooked=False))
    hooked = run_inprocess(2, lambda comm: _train(comm, config, hooked=True))
    for a, b in zip(explicit, hooked):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    if name.startswith("eager"):  # consolidate() ran on exit: every worker holds one model
        assert all(torch.equal(hooked[0][k], hooked[1][k]) for k in hooked[0] if k.startswith("theta."))


def _one_worker(config: DiLoCoConfig | None = None, **kwargs) -> tuple[TinyNet, torch.optim.Optimizer, DiLoCo]:
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    loco = DiLoCo(model, inner, config or DiLoCoConfig(sync_every=2), comm=InProcessGroup(1).communicator(0), **kwargs)
    return model, inner, loco


def _inner_step(model, inner) -> None:
    model(torch.ones(2, 4)).sum().backward()
    inner.step()
    inner.zero_grad()


def test_a_manual_step_inside_the_hooked_block_is_refused():
    model, inner, loco = _one_worker()
    with pytest.raises(RuntimeError, match=r"step\(\) called by hand inside `with DiLoCo"), loco:
        _inner_step(model, inner)
        loco.step()
    assert loco.inner_step == 1 and not loco.finalized  # an error leaves the block without draining


def test_the_hook_is_removed_on_exit_and_the_block_cannot_be_entered_twice():
    model, inner, loco = _one_worker()
    with loco:
        _inner_step(model, inner)
        with pytest.raises(RuntimeError, match="already in use"), loco:
            pass
    assert loco.finalized and loco.inner_step == 1
    _inner_step(model, inner)  # no hook any more: the finalized wrapper is not stepped
    assert loco.inner_step == 1
    with pytest.raises(RuntimeError, match="after finalize"), loco:
        pass


def test_the_hook_needs_the_inner_optimizer():
    model = TinyNet()
    loco = DiLoCo(model, None, DiLoCoConfig(sync_every=2), comm=InProcessGroup(1).communicator(0))
    with pytest.raises(ConfigError, match="needs the inner optimizer"), loco:
        pass


def test_fragments_by_module_name_patterns_equal_fragments_by_modules():
    model = TinyNet()
    by_module = DiLoCo(
        model,
        None,
        DiLoCoConfig(sync_every=4, num_fragments=2),
        comm=InProcessGroup(1).communicator(0),
        fragments=[[model.inp, model.blocks[0], model.blocks[2]], [model.blocks[1], model.blocks[3], model.head]],
    )
    by_name = DiLoCo(
        model,
        None,
        DiLoCoConfig(sync_every=4, num_fragments=2),
        comm=InProcessGroup(1).communicator(0),
        fragments=[["inp", "blocks.[02]"], ["blocks.[13]", "head"]],
    )
    assert [f.names for f in by_name.fragments] == [f.names for f in by_module.fragments]
    expected = ["inp.weight", "inp.bias", "blocks.0.weight", "blocks.0.bias", "blocks.2.weight", "blocks.2.bias"]
    assert by_name.fragments[0].names == expected


def test_a_fragment_pattern_that_matches_nothing_is_one_line_error():
    model = TinyNet()
    with pytest.raises(ConfigError, match=r"fragment pattern 'layers\.\*' matches no module"):
        DiLoCo(
            model,
            None,
            DiLoCoConfig(sync_every=4, num_fragments=2),
            comm=InProcessGroup(1).communicator(0),
            fragments=["layers.*", "head"],
        )
    with pytest.raises(ConfigError, match="overlap"):  # patterns obey the same checks as modules
        DiLoCo(
            model,
            None,
            DiLoCoConfig(sync_every=4, num_fragments=2),
            comm=InProcessGroup(1).communicator(0),
            fragments=[["inp", "blocks.*"], ["blocks.3", "head"]],
        )
