"""The language-model demo's model and data layer: a small GPT (:mod:`eagerloco.lm.model`), byte / BPE tokenizers
(:mod:`eagerloco.lm.tokenizer`), offline corpora (:mod:`eagerloco.lm.corpora`), per-worker samplers
(:mod:`eagerloco.lm.batches`) and the run's data bundle (:mod:`eagerloco.lm.data`).

Needs the ``lm`` extra (numpy; ``tokenizers`` for BPE only).
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved lazily (``eagerloco plot`` and ``simulate`` must not pay for torch and numpy imports).
_MODULE_OF = {
    **dict.fromkeys(
        ["CORPORA", "Corpus", "CorpusError", "Document", "load_corpus", "split_corpus", "split_text"],
        "eagerloco.lm.corpora",
    ),
    **dict.fromkeys(
        ["SHARDINGS", "BatchSampler", "EvalBatches", "TokenStream", "shard_documents"], "eagerloco.lm.batches"
    ),
    **dict.fromkeys(["LMData", "default_cache_dir", "prepare_data"], "eagerloco.lm.data"),
    **dict.fromkeys(["GPT", "GPTConfig", "evaluate_loss"], "eagerloco.lm.model"),
    **dict.fromkeys(
        ["TOKENIZER_KINDS", "BPETokenizer", "ByteTokenizer", "Tokenizer", "build_tokenizer"], "eagerloco.lm.tokenizer"
    ),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'eagerloco.lm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CORPORA",
    "GPT",
    "SHARDINGS",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "Document",
    "EvalBatches",
    "GPTConfig",
    "LMData",
    "TokenStream",
    "Tokenizer",
    "build_tokenizer",
    "default_cache_dir",
    "evaluate_loss",
    "load_corpus",
    "prepare_data",
    "shard_documents",
    "split_corpus",
    "split_text",
]
