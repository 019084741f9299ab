"""A tiny trainable text encoder for closed-vocabulary captions (the demo model's "CLIP").

Captions are lower-cased and split on whitespace (surrounding punctuation is dropped); each word is
looked up in the fixed word list given in the config. Ids: 0 = <pad>, 1 = <unk>, then the words in
order. The sequence is padded (or, with a warning, truncated) to ``max_length`` tokens, embedded with
learned token and position embeddings, passed through ``n_layers`` small pre-norm transformer layers
and a final LayerNorm, and returned as a ``(B, max_length, embed_dim)`` context for cross-attention.

The empty caption ``""`` becomes an all-<pad> sequence: it is the unconditional prompt of
classifier-free guidance (the training script drops captions to ``""`` now and then).

Unknown words are an error by default (:class:`UnknownWordError`, naming the word and listing the
vocabulary); with ``unknown="warn"`` they map to <unk> with a warning instead.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Union

import torch
import torch.nn as nn

from ldm.errors import InputWarning, UsageError

PAD_ID = 0
UNK_ID = 1
_STRIP = ".,;:!?\"'()[]{}"


class UnknownWordError(UsageError):
    """A caption uses a word outside the encoder's vocabulary."""


def split_words(text: str) -> List[str]:
    """Lower-case whitespace tokenisation; punctuation around a word is dropped."""
    words = []
    for raw in str(text).lower().split():
        w = raw.strip(_STRIP)
        if w:
            words.append(w)
    return words


class WordEmbedder(nn.Module):
    """Closed-vocabulary caption encoder: ``forward(list_of_str) -> (B, max_length, embed_dim)``."""

    def __init__(self, vocab: Sequence[str], embed_dim: int = 64, max_length: int = 8, n_layers: int = 1,
                 n_heads: int = 2, ff_mult: int = 2, dropout: float = 0.0, unknown: str = "error"):
        super().__init__()
        words = [str(w).lower() for w in vocab]
        if len(set(words)) != len(words):
            raise ValueError(f"duplicate words in vocab: {words}")
        bad = [w for w in words if not w or split_words(w) != [w]]
        if bad:
            raise ValueError(f"vocab entries must be single lower-case words without punctuation: {bad}")
        if unknown not in ("error", "warn"):
            raise ValueError(f"unknown must be 'error' or 'warn', not {unknown!r}")
        self.vocab = words
        self.word_to_id = {w: i + 2 for i, w in enumerate(words)}
        self.max_length = int(max_length)
        self.embed_dim = int(embed_dim)
        self.unknown = unknown
        self.token_embedding = nn.Embedding(len(words) + 2, embed_dim)
        self.position_embedding = nn.Embedding(self.max_length, embed_dim)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(embed_dim, n_heads, dim_feedforward=ff_mult * embed_dim, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(int(n_layers))])
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    # ------------------------------------------------------------------------------------------

    def vocabulary_text(self) -> str:
        return ", ".join(self.vocab)

    def tokenize(self, text: Union[str, Sequence[str]]) -> torch.Tensor:
        """Token ids, shape (B, max_length), long; "" gives all <pad>."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = []
        for t in texts:
            words = split_words(t)
            unknown = [w for w in words if w not in self.word_to_id]
            if unknown:
                msg = (f"word(s) {unknown} in prompt {t!r} are not in the vocabulary of this model; "
                       f"known words: {self.vocabulary_text()} (e.g. 'a red circle')")
                if self.unknown == "error":
                    raise UnknownWordError(msg)
                warnings.warn(msg + "; they are encoded as <unk>", stacklevel=2)
            ids = [self.word_to_id.get(w, UNK_ID) for w in words]
            if len(ids) > self.max_length:
                seen = self.__dict__.setdefault("_truncation_warned", set())  # once per prompt and model
                if t not in seen:
                    seen.add(t)
                    dropped = words[self.max_length:]
                    warnings.warn(f"prompt {t!r} has {len(ids)} words but this model reads at most "
                                  f"{self.max_length}: the last {len(dropped)} ({' '.join(dropped)!r}) are dropped",
                                  InputWarning, stacklevel=2)
                ids = ids[:self.max_length]
            rows.append(ids + [PAD_ID] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, text: Union[str, Sequence[str]]) -> torch.Tensor:
        tokens = self.tokenize(text).to(self.token_embedding.weight.device)
        pos = torch.arange(self.max_length, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(pos)[None]
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)

    def encode(self, text):
        return self(text)
