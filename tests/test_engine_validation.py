"""Every validation error, raised before training with a message that names the value and the rule."""

from __future__ import annotations

import pytest
import torch

from _toy import Quadratic, TinyNet, run_inprocess
from eagerloco import ConfigError, DiLoCo, DiLoCoConfig, ModelMismatch
from eagerloco.comm import InProcessGroup


def make(config: DiLoCoConfig, model=None, **kwargs) -> DiLoCo:
    model = model or TinyNet()
    return DiLoCo(model, None, config, comm=InProcessGroup(1).communicator(0), **kwargs)


@pytest.mark.parametrize(
    "fields,pattern",
    [
        ({"sync_every": 0}, r"sync_every=0: H must be an integer >= 1"),
        ({"sync_every": 2.5}, r"sync_every=2.5: H must be an integer >= 1"),
        ({"num_fragments": 0}, r"num_fragments=0: P must be an integer >= 1"),
        ({"sync_every": 10, "num_fragments": 3}, r"num_fragments=3 does not divide sync_every=10"),
        ({"mode": "overlap", "sync_every": 4, "overlap_steps": 4}, r"overlap_steps=4 >= sync_every=4: τ must be < H"),
        ({"mode": "overlap", "overlap_steps": -1}, r"overlap_steps=-1: τ must be an integer >= 0"),
        ({"alpha": 1.5}, r"alpha=1.5: α must be a number in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha=-0.1: α must be a number in \[0, 1\]"),
        ({"delay": 0}, r"delay=0: k must be an integer >= 1"),
        ({"mode": "fast"}, r"mode='fast': must be one of sync, overlap, delayed, eager"),
        ({"outer_lr": 0.0}, r"outer_lr=0.0: must be > 0"),
        ({"outer_lr": float("nan")}, r"outer_lr=nan: must be a finite number >= 0"),
        ({"outer_momentum": 1.0}, r"outer_momentum=1.0: must be < 1"),
        ({"fragment_layout": "random"}, r"fragment_layout='random': must be 'strided' or 'sequential'"),
        ({"collective_timeout_s": 0}, r"collective_timeout_s=0: must be a finite number of seconds > 0"),
        ({"error_feedback": True}, r"error_feedback=True needs a lossy codec"),
        ({"compression": "int4"}, r"compression='int4': unknown codec; valid codecs: none, bf16, fp16, fp8, int8, fp4"),
        ({"compression": "fp3"}, r"compression='fp3': unknown codec"),
    ],
)
def test_config_errors(fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DiLoCoConfig(**fields).validate()
    with pytest.raises(ConfigError, match=pattern):  # and the wrapper validates before doing anything
        make(DiLoCoConfig(**fields))


def test_the_config_knows_exactly_the_shipped_codecs():
    from eagerloco.compression import CODECS
    from eagerloco.engine.config import CODEC_NAMES

    assert CODEC_NAMES == CODECS


def test_unknown_config_field():
    with pytest.raises(ConfigError, match=r"unknown DiLoCoConfig field\(s\) \['sync_evry'\]"):
        DiLoCoConfig.from_dict({"sync_evry": 3})


def test_more_fragments_than_blocks():
    with pytest.raises(ConfigError, match=r"num_fragments=8 but the model has 4 repeated blocks"):
        make(DiLoCoConfig(sync_every=8, num_fragments=8))


def test_fragments_need_blocks():
    with pytest.raises(ConfigError, match=r"num_fragments=2 but the model has 0 repeated blocks"):
        make(DiLoCoConfig(sync_every=2, num_fragments=2), model=Quadratic())


def test_explicit_fragments_empty():
    model = TinyNet()
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    model.extra = frozen
    with pytest.raises(ConfigError, match=r"fragment 1 is empty: its modules hold no trainable parameters"):
        make(DiLoCoConfig(sync_every=2, num_fragments=2), model=model, fragments=[[model.inp], [frozen]])


def test_explicit_fragments_overlap():
    model = TinyNet()
    with pytest.raises(ConfigError, match=r"fragments 0 and 1 overlap: both hold parameter 'blocks.0.weight'"):
        make(
            DiLoCoConfig(sync_every=2, num_fragments=2),
            model=model,
            fragments=[[model.inp, model.blocks[0]], [model.blocks, model.head]],
        )


def test_explicit_fragments_missing_parameters():
    model = TinyNet()
    with pytest.raises(ConfigError, match=r"parameters missing from all fragments: head.weight, head.bias"):
        make(
            DiLoCoConfig(sync_every=2, num_fragments=2),
            model=model,
            fragments=[[model.inp], [model.blocks]],
        )


def test_explicit_fragments_count_must_match():
    model = TinyNet()
    with pytest.raises(ConfigError, match=r"3 explicit fragments given but num_fragments=2"):
        make(DiLoCoConfig(sync_every=2, num_fragments=2), model=model, fragments=[model.inp, model.blocks, model.head])


def test_no_trainable_parameters():
    with pytest.raises(ConfigError, match=r"no trainable parameters"):
        make(DiLoCoConfig(), model=torch.nn.Linear(2, 2).requires_grad_(False))


def test_different_model_shapes_across_workers():
    def worker(comm):
        model = TinyNet(width=8 if comm.rank == 0 else 6)
        return DiLoCo(model, None, DiLoCoConfig(), comm=comm)

    with pytest.raises(RuntimeError, match=r"models differ across workers at parameter #0: worker \d has 'inp.weight'"):
        run_inprocess(2, worker)


def test_different_model_depth_across_workers():
    def worker(comm):
        return DiLoCo(TinyNet(depth=4 if comm.rank == 0 else 3), None, DiLoCoConfig(), comm=comm)

    with pytest.raises(RuntimeError, match=r"models differ across workers"):
        run_inprocess(2, worker)


def test_different_config_across_workers():
    def worker(comm):
        config = DiLoCoConfig(sync_every=4 if comm.rank == 0 else 6)
        return DiLoCo(TinyNet(), None, config, comm=comm)

    with pytest.raises(RuntimeError, match=r"runs another configuration .*sync_every=\d vs \d"):
        run_inprocess(2, worker)


def test_model_mismatch_is_its_own_type():
    errors = []

    def worker(comm):
        try:
            DiLoCo(TinyNet(width=8 if comm.rank == 0 else 6), None, DiLoCoConfig(), comm=comm)
        except ModelMismatch as exc:
            errors.append(exc)

    run_inprocess(2, worker)
    assert len(errors) == 2


def test_step_after_finalize_is_refused():
    loco = make(DiLoCoConfig(sync_every=2))
    loco.finalize()
    with pytest.raises(RuntimeError, match=r"step\(\) after finalize\(\)"):
        loco.step()


def test_consolidate_needs_finalize():
    loco = make(DiLoCoConfig(sync_every=2))
    with pytest.raises(RuntimeError, match=r"consolidate\(\) needs finalize\(\) first"):
        loco.consolidate()


def test_the_engine_modules_import_each_other_without_a_cycle():
    """engine/*.py form a DAG (imports under TYPE_CHECKING included; the package __init__ only re-exports)."""
    import ast
    from pathlib import Path

    import eagerloco.engine

    root = Path(eagerloco.engine.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eagerloco.engine"):
                assert node.module != "eagerloco.engine", f"{path.name} imports the package, not a module"
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join((*stack, module))}"
        if module not in done:
            for dep in sorted(graph[module]):
                visit(dep, (*stack, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
    assert {"errors", "recorder", "core", "strategies", "diloco"} <= done
