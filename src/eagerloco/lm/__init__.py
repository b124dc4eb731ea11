"""The language-model demo's model and data layer: a small GPT (:mod:`eagerloco.lm.model`), byte / BPE tokenizers
(:mod:`eagerloco.lm.tokenizer`) and offline corpora with per-worker samplers (:mod:`eagerloco.lm.data`).

Needs the ``lm`` extra (numpy; ``tokenizers`` for BPE only).
"""

from eagerloco.lm.data import (
    CORPORA,
    SHARDINGS,
    BatchSampler,
    Corpus,
    CorpusError,
    Document,
    EvalBatches,
    LMData,
    TokenStream,
    default_cache_dir,
    load_corpus,
    prepare_data,
    shard_documents,
    split_corpus,
    split_text,
)
from eagerloco.lm.model import GPT, GPTConfig, evaluate_loss
from eagerloco.lm.tokenizer import TOKENIZER_KINDS, BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer

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
