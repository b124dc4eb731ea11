"""A small GPT-style decoder-only language model for the demo (nanoGPT-like, CPU-friendly).

Architecture (pre-norm, GPT-2 layout with a few modern options)::

    h_0 = wte[idx] (+ wpe[pos] with learned positions)
    h_l = h_{l-1} + Attn(Norm(h_{l-1}))            for l = 1..L
    h_l = h_l     + MLP(Norm(h_l))
    logits = Norm(h_L) · wteᵀ                       (output head tied to the token embedding)

* **Positions**: rotary (RoPE, the default: interleaved-pair layout, base 10 000, applied to q and k in every
  layer as one complex multiplication; no parameters, the angle table is a non-persistent buffer ``rope``) or a
  learned absolute table ``wpe`` (GPT-2), chosen by :attr:`GPTConfig.pos_emb`.
* **Attention**: one fused ``qkv`` projection (d → 3d), all heads at once through
  :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True`` (no Python loop over heads).
  Optional **QK-norm** normalises q and k per head (over the head dimension, learned scale shared by all heads)
  before RoPE and the dot product, which bounds the attention logits.
* **MLP**: d → ``mlp_ratio``·d → d with exact GELU.
* **Norm**: RMSNorm (default) or LayerNorm, pre-norm in every block plus a final norm.
* **Loss**: mean token cross-entropy, plus optional **z-loss** ``z_loss · mean_t(logsumexp(logits_t)²)``
  (PaLM, coefficient 1e-4), which keeps the softmax normaliser near 1.
* **Init** (GPT-2): every weight matrix and the embeddings ~ N(0, 0.02²); the two residual output projections
  (attention ``proj`` and MLP ``proj``) ~ N(0, (0.02/√(2L))²) so that the residual stream's variance does not grow
  with depth; biases 0, norm scales 1. Initialisation draws from a private generator seeded with ``seed``, so two
  models built with the same config and seed are bitwise identical, and building one leaves the global RNG alone.

The transformer blocks live in ``model.blocks`` (an :class:`torch.nn.ModuleList`); the parameters registered before
them are the embeddings (``wte``, ``wpe``), after them the final norm ``norm_f``. The output head ``lm_head`` shares
its weight with ``wte`` (one parameter, listed once by ``named_parameters()`` as ``wte.weight``). Streaming DiLoCo
fragments split the model by block (block l → fragment l mod P; embeddings with fragment 0, final norm with P − 1).

Size guidance (CPU demo): the default config (L=4, d=128, 4 heads, T=128, byte vocabulary) has 820 352 parameters
and costs about 5.7 MFLOP per token for forward + backward (:meth:`GPT.flops_per_token`). On one CPU thread a
training step (forward, backward, AdamW) at batch 32 × 128 tokens takes about 0.25 s (≈ 16 k tokens/s), so a
3-5 minute run with one thread per worker fits roughly 700-1200 inner steps; d_model=192 doubles the cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPTConfig", "evaluate_loss"]

PosEmb = Literal["rope", "learned"]
NormKind = Literal["rmsnorm", "layernorm"]


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT`. Validated on construction (``ValueError`` on a bad value)."""

    vocab_size: int = 256
    """Number of token ids (256 for the byte tokenizer; the BPE tokenizer's ``vocab_size`` otherwise)."""
    seq_len: int = 128
    """Context length T: the longest sequence ``forward`` accepts (size of the position table / RoPE cache)."""
    n_layer: int = 4
    """Number of transformer blocks L (the units that Streaming DiLoCo distributes over fragments)."""
    n_head: int = 4
    """Attention heads per block; must divide ``d_model`` (head dim = d_model / n_head, even with RoPE)."""
    d_model: int = 128
    """Width d of the residual stream and of the token embedding."""
    mlp_ratio: int = 4
    """MLP hidden width = mlp_ratio · d_model (4 in GPT-2)."""
    pos_emb: PosEmb = "rope"
    """Positional encoding: 'rope' (rotary, parameter-free) or 'learned' (absolute table of seq_len × d_model)."""
    rope_base: float = 10000.0
    """RoPE base θ: pair i of a head rotates by position · θ^(−2i/head_dim)."""
    norm: NormKind = "rmsnorm"
    """Normalisation layer: 'rmsnorm' (x / rms(x) · g) or 'layernorm' ((x − mean) / std · g [+ b])."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance in every norm."""
    qk_norm: bool = False
    """Normalise q and k per head (same norm kind, over the head dimension) before attention."""
    z_loss: float = 0.0
    """Z-loss coefficient c: the training loss adds c · mean(logsumexp(logits)²). 0 disables it; 1e-4 in PaLM."""
    dropout: float = 0.0
    """Dropout on attention probabilities and on each residual branch (training only). 0 = no dropout."""
    bias: bool = False
    """Biases in the linear layers and LayerNorm (GPT-2 has them; off is slightly faster and as good)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (residual projections use init_std / √(2·n_layer))."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.pos_emb not in ("rope", "learned"):
            raise ValueError(f"GPTConfig.pos_emb must be 'rope' or 'learned', got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got d_model/n_head = {self.head_dim}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"GPTConfig.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if not self.z_loss >= 0.0:
            raise ValueError(f"GPTConfig.z_loss must be >= 0, got {self.z_loss!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0.0 or not self.init_std > 0.0 or not self.rope_base > 0.0:
            raise ValueError("GPTConfig.norm_eps, init_std and rope_base must be > 0")

    @property
    def head_dim(self) -> int:
        """d_model / n_head."""
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for checkpoints and logs); ``GPTConfig(**d)`` rebuilds it."""
        return asdict(self)


def _make_norm(kind: NormKind, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def _rope_table(seq_len: int, head_dim: int, base: float) -> Tensor:
    """(cos, sin) of the rotation angles stacked as (seq_len, head_dim/2, 2): angle[t, i] = t · base^(−2i/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).float()


def _apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate each pair (x_2i, x_2i+1) of the last dimension of x (..., T, h) by angle[t, i] (interleaved layout,
    as in the original RoFormer / LLaMA code), as one complex multiplication: (x_2i + i·x_2i+1) · e^{i·angle}.
    Computed in float32 (float64 for float64 inputs) and cast back to x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xc = torch.view_as_complex(x.to(dtype).reshape(*x.shape[:-1], -1, 2))
    rot = torch.view_as_complex(table.to(dtype).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: fused qkv projection, optional QK-norm and RoPE, SDPA, output projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = _make_norm(config.norm, self.head_dim, config.norm_eps, config.bias)
            self.k_norm = _make_norm(config.norm, self.head_dim, config.norm_eps, config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: Tensor | None) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3, H, h) → (3, B, H, T, h); q and k stay stacked so that QK-norm and RoPE run once on both.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        qk, v = qkv[:2], qkv[2]
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.stack((self.q_norm(qk[0]), self.k_norm(qk[1])))
        if rope is not None:
            qk = _apply_rope(qk, rope[:T])
        q, k = qk.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(d, r·d) → GELU → Linear(r·d, d)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm2 = _make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model (see the module docstring for the architecture and init).

    Args:
        config: the hyper-parameters.
        seed: seed of the initialisation. ``None`` draws from (and advances) the global torch RNG instead.
    """

    def __init__(self, config: GPTConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        # The layers' own default initialisation is overwritten by reset_parameters; running it under fork_rng keeps
        # it from advancing the global RNG.
        with torch.random.fork_rng(devices=[]):
            self.wte = nn.Embedding(config.vocab_size, config.d_model)
            self.wpe = nn.Embedding(config.seq_len, config.d_model) if config.pos_emb == "learned" else None
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.norm_f = _make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter, one storage
        if config.pos_emb == "rope":
            self.register_buffer(
                "rope", _rope_table(config.seq_len, config.head_dim, config.rope_base), persistent=False
            )
        else:
            self.register_buffer("rope", None, persistent=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """(Re-)initialise every parameter (GPT-2 scheme, see the module docstring) from ``seed``."""
        gen: torch.Generator | None = None
        if seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)

        def normal_(t: Tensor, s: float) -> None:
            # Draw on the CPU so that the values do not depend on the device the model lives on.
            t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, s, generator=gen))

        normal_(self.wte.weight, std)
        if self.wpe is not None:
            normal_(self.wpe.weight, std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                normal_(module.weight, resid_std if name.endswith(".proj") else std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (the tied head counted once).

        With ``non_embedding=True`` the token and position embedding tables are left out (Kaplan et al.'s N).
        For the default options (RMSNorm, no biases, RoPE, no QK-norm) the total is
        ``V·d + L·(2 + (3 + 1 + 2r)·d)·d + d`` = ``V·d + L·(12d² + 2d) + d`` with r = 4.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), 6·N + 12·L·T·d (Kaplan et al. / PaLM appendix B), where N is
        the non-embedding parameter count plus the tied output head (V·d) and T the context length."""
        c = self.config
        t = c.seq_len if seq_len is None else seq_len
        n = self.num_parameters(non_embedding=True) + c.vocab_size * c.d_model
        return 6 * n + 12 * c.n_layer * t * c.d_model

    def hidden_states(self, idx: Tensor) -> Tensor:
        """Final-norm hidden states (B, T, d) for token ids ``idx`` (B, T), T ≤ seq_len."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if self.config.seq_len < T:
            raise ValueError(f"sequence of length {T} exceeds the model's seq_len={self.config.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.rope)
        return self.norm_f(x)

    def loss_terms(self, logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
        """(cross-entropy, z-loss term) for ``logits`` (B, T, V) and ``targets`` (B, T).

        cross-entropy = mean over the non-ignored positions of −log softmax(logits)[target];
        z-loss term = z_loss · mean over the same positions of logsumexp(logits)² (a zero tensor when disabled).
        Both are computed in float32.
        """
        flat = logits.reshape(-1, logits.shape[-1]).float()
        flat_targets = targets.reshape(-1)
        ce = F.cross_entropy(flat, flat_targets, ignore_index=ignore_index)
        if self.config.z_loss > 0.0:
            lse = torch.logsumexp(flat, dim=-1)
            keep = flat_targets != ignore_index
            z = self.config.z_loss * lse[keep].square().mean()
        else:
            z = ce.new_zeros(())
        return ce, z

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for ``idx`` (B, T) and, when ``targets`` (B, T) is given, the training loss
        cross-entropy + z-loss term (the z-loss term is 0 unless ``config.z_loss > 0``); otherwise ``None``."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        ce, z = self.loss_terms(logits, targets)
        return logits, ce + z

    def cross_entropy(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Plain mean cross-entropy (nats per token, no z-loss) of predicting ``targets`` from ``idx``: the
        evaluation metric. Runs under the caller's grad mode and train/eval mode."""
        logits = self.lm_head(self.hidden_states(idx))
        return self.loss_terms(logits, targets)[0]

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for AdamW: matrices (linear weights, embeddings) decay, vectors (norm scales, biases)
        do not (nanoGPT's rule: decay iff ``p.dim() >= 2``)."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Autoregressively extend ``idx`` (B, T0) by ``max_new_tokens`` sampled tokens; returns (B, T0 + new).

        Each step conditions on the last ``seq_len`` tokens, divides the last position's logits by ``temperature``
        (``temperature <= 0`` means greedy argmax), keeps only the ``top_k`` largest when given, and samples from
        the softmax with ``generator`` (on the model's device). The model runs in eval mode (no dropout) and is
        returned to its previous mode afterwards. No KV cache: every step recomputes the context window.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be (batch, time) with time >= 1, got shape {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.seq_len :]
                logits = self.lm_head(self.hidden_states(context)[:, -1, :]).float()
                if temperature <= 0.0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
        finally:
            self.train(was_training)
        return idx


@torch.no_grad()
def evaluate_loss(
    model: GPT, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str | None = None
) -> float:
    """Token-weighted mean cross-entropy (nats/token) of ``model`` over ``batches`` of (x, y), in eval mode (the
    previous mode is restored). Batches of different sizes are weighted by their number of tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            total += model.cross_entropy(x, y).item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss got no batches")
    return total / count
