"""Tests of the demo language model (eagerloco.lm.model)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eagerloco.lm.model import GPT, GPTConfig, _apply_rope, _rope_table, evaluate_loss


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**overrides) -> GPTConfig:
    fields = {"vocab_size": 61, "seq_len": 16, "n_layer": 2, "n_head": 2, "d_model": 32}
    fields.update(overrides)
    return GPTConfig(**fields)


VARIANTS = [
    {},
    {"pos_emb": "learned"},
    {"qk_norm": True},
    {"norm": "layernorm", "bias": True, "qk_norm": True, "pos_emb": "learned"},
    {"norm": "layernorm", "bias": False, "z_loss": 1e-4},
]


def expected_num_parameters(c: GPTConfig) -> int:
    d, hd, L, V, T, r = c.d_model, c.head_dim, c.n_layer, c.vocab_size, c.seq_len, c.mlp_ratio
    norm = 2 if (c.norm == "layernorm" and c.bias) else 1  # parameters per normalised feature
    block = (4 + 2 * r) * d * d + 2 * norm * d
    if c.bias:
        block += 3 * d + d + r * d + d
    if c.qk_norm:
        block += 2 * norm * hd
    total = V * d + L * block + norm * d
    if c.pos_emb == "learned":
        total += T * d
    return total


# ------------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "n_head": 4}, "divisible"),
        ({"d_model": 30, "n_head": 2}, "even head dimension"),
        ({"pos_emb": "alibi"}, "pos_emb"),
        ({"norm": "batchnorm"}, "norm"),
        ({"z_loss": -1e-4}, "z_loss"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_round_trips_through_dict():
    c = tiny(qk_norm=True, z_loss=1e-4)
    assert GPTConfig(**c.to_dict()) == c


# --------------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_count_formula(overrides):
    c = tiny(**overrides)
    model = GPT(c)
    assert model.num_parameters() == expected_num_parameters(c)
    embeddings = c.vocab_size * c.d_model + (c.seq_len * c.d_model if c.pos_emb == "learned" else 0)
    assert model.num_parameters(non_embedding=True) == expected_num_parameters(c) - embeddings


def test_default_config_size_matches_docstring():
    model = GPT(GPTConfig())
    assert model.num_parameters() == 256 * 128 + 4 * (12 * 128 * 128 + 2 * 128) + 128 == 820_352
    # 6·N + 12·L·T·d, N = non-embedding parameters + the tied head = all 820 352 parameters here
    assert model.flops_per_token() == 6 * 820_352 + 12 * 4 * 128 * 128


def test_tied_embedding_shares_storage():
    model = GPT(tiny())
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and not any(n.startswith("lm_head") for n in names)
    idx = torch.randint(0, 61, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert model.lm_head.weight is model.wte.weight


def test_blocks_layout_for_streaming_fragments():
    from eagerloco.engine.fragments import find_blocks

    model = GPT(tiny(n_layer=3, pos_emb="learned"))
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 3
    assert find_blocks(model) is model.blocks
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["wte.weight", "wpe.weight"]  # before the blocks: fragment 0
    assert names[-1] == "norm_f.weight"  # after the blocks: fragment P - 1
    assert all(n.startswith("blocks.") for n in names[2:-1])
    assert "rope" not in model.state_dict()


def test_initialisation_statistics():
    c = GPTConfig(vocab_size=512, seq_len=16, n_layer=3, n_head=4, d_model=128, pos_emb="learned")
    model = GPT(c)
    resid = 0.02 / math.sqrt(2 * c.n_layer)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.mlp.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(block.norm1.weight, torch.ones(c.d_model))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(model.wte.weight.mean().item()) < 1e-3


def test_initialisation_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = GPT(tiny(), seed=3), GPT(tiny(), seed=3), GPT(tiny(), seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    a.reset_parameters(4)
    assert torch.equal(a.wte.weight, c.wte.weight)


# -------------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causality(overrides):
    model = GPT(tiny(**overrides)).eval()
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 61
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4


def test_loss_at_init_is_log_vocab():
    model = GPT(GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=2, d_model=64))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (8, 32), generator=gen)
    targets = torch.randint(0, 256, (8, 32), generator=gen)
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)


def test_z_loss_adds_exactly_coefficient_times_mean_squared_lse():
    coef = 1e-2
    model = GPT(tiny(z_loss=coef), seed=5)
    plain = GPT(tiny(), seed=5)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 61, (3, 16), generator=gen)
    targets = torch.randint(0, 61, (3, 16), generator=gen)
    logits, loss = model(idx, targets)
    ce = F.cross_entropy(logits.reshape(-1, 61), targets.reshape(-1))
    z = coef * torch.logsumexp(logits, dim=-1).square().mean()
    torch.testing.assert_close(loss, ce + z, rtol=1e-6, atol=0)
    assert torch.equal(model.cross_entropy(idx, targets), ce)
    _, plain_loss = plain(idx, targets)
    assert torch.equal(plain_loss, ce)  # same weights, no z-loss: exactly the cross-entropy
    ce_term, z_term = model.loss_terms(logits, targets)
    assert torch.equal(ce_term, ce) and torch.equal(z_term, z)


def test_z_loss_ignores_masked_targets():
    model = GPT(tiny(z_loss=1e-3))
    idx = torch.randint(0, 61, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    lse = torch.logsumexp(logits, dim=-1)[keep]
    ce = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, ce + 1e-3 * lse.square().mean(), rtol=1e-6, atol=0)


def test_rope_depends_only_on_relative_position():
    table = _rope_table(32, 8, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    x = torch.zeros(32, 8)

    def score(m: int, n: int) -> float:
        qs, ks = x.clone(), x.clone()
        qs[m], ks[n] = q, k
        return float(_apply_rope(qs, table)[m] @ _apply_rope(ks, table)[n])

    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    assert torch.equal(_apply_rope(x[:1] + q, table[:1])[0], q)  # position 0: identity


def test_rejects_sequences_longer_than_context():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = GPT(tiny(qk_norm=True, z_loss=1e-4))
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=3e-3)
    idx = torch.arange(17).remainder(7).repeat(4, 1)  # periodic sequence: learnable
    x, y = idx[:, :-1], idx[:, 1:]
    first = model.cross_entropy(x, y).item()
    for _ in range(40):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert model.cross_entropy(x, y).item() < 0.3 * first


def test_optimizer_groups_partition_parameters():
    model = GPT(tiny(norm="layernorm", bias=True, qk_norm=True))
    decay, no_decay = model.optimizer_groups(0.1)
    ids = [id(p) for p in decay["params"]] + [id(p) for p in no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_evaluate_loss_is_token_weighted_and_restores_mode():
    model = GPT(tiny()).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 61, (5, 16), generator=gen)
    y = torch.randint(0, 61, (5, 16), generator=gen)
    value = evaluate_loss(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert model.training
    with torch.no_grad():
        expected = model.eval().cross_entropy(x, y).item()
    assert value == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_loss(model, [])


# --------------------------------------------------------------------------------------------------- sampling


def test_generate_is_reproducible_and_respects_options():
    model = GPT(tiny(dropout=0.1)).train()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = model.generate(prompt, 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    assert model.training  # mode restored
    assert a.shape == (2, 23) and torch.equal(a[:, :3], prompt) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 61
    greedy = model.generate(prompt, 20, temperature=0.0)  # longer than seq_len=16: the context is cropped
    top1 = model.generate(prompt, 20, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)
    model.eval()
    with torch.no_grad():
        logits, _ = model(greedy[:, -17:-1])
    assert torch.equal(greedy[:, -1], logits[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)
