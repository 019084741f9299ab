"""Offline CLIP BPE tokenizer for the SD 1.x text encoder.

SD1 tokenized with the Hugging Face ``CLIPTokenizer`` of ``openai/clip-vit-large-patch14``, which would
have to be downloaded. Its vocabulary is the same byte-level BPE that ships inside the ``open_clip``
package (``bpe_simple_vocab_16e6.txt.gz``), so the token ids can be reproduced from that file alone.
Two details differ from ``open_clip.tokenize`` and matter for SD1, which feeds all 77 positions to the
UNet: padding uses ``<|endoftext|>`` (49407) instead of 0, and the text is not HTML-unescaped.
"""
import gzip
import importlib.util
import os
import re
from functools import lru_cache

import torch

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48894 merges, 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"


def default_bpe_path():
    """Path of the BPE file inside the installed open_clip package, found without importing it (slow)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip is not installed; it provides {BPE_FILE_NAME}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BPE_FILE_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{BPE_FILE_NAME} not found in the open_clip package")


@lru_cache()
def byte_to_unicode():
    """Byte -> printable character table of byte-level BPE, in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are mapped to
    code points from 256 on, so every byte string becomes a string without whitespace.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # vocabulary order: the kept bytes first, then the remapped ones
    order = keep + [b for b in range(256) if b not in keep]
    return {b: table[b] for b in order}


def read_merges(bpe_path=None):
    """The merge rules of the CLIP vocabulary, as (left, right) pairs in priority order."""
    with gzip.open(bpe_path or default_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # the first line is a version header
    return [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]


def build_vocab(merges):
    """Token string -> id, built the way CLIP defines it."""
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def _clean(text):
    """Normalisation of the HF slow CLIPTokenizer: ftfy, whitespace collapse, lower case."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:  # HF falls back to plain text too
        pass
    return re.sub(r"\s+", " ", text).strip().lower()


class CLIPBPETokenizer:
    """CLIP tokenizer with the behaviour of ``CLIPTokenizer(padding="max_length", truncation=True)``.

    ``__call__(texts) -> LongTensor (B, max_length)``: ``<|startoftext|>``, at most ``max_length - 2``
    BPE tokens, ``<|endoftext|>``, then ``pad_token_id`` up to ``max_length``.
    """

    def __init__(self, bpe_path=None, max_length=77, pad_token_id=None):
        import regex  # needs \p{..} classes, like every CLIP tokenizer

        self.max_length = max_length
        merges = read_merges(bpe_path)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.encoder = build_vocab(merges)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = byte_to_unicode()
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.pad_token_id = self.eot_token_id if pad_token_id is None else pad_token_id
        self.specials = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._cache = {}

    @property
    def vocab_size(self):
        return len(self.encoder)

    def bpe(self, word):
        """Split one pre-token (already byte-mapped) into BPE symbols by repeatedly applying the best merge."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text):
        """Token ids of ``text`` without the start/end tokens."""
        ids = []
        for piece in self.pattern.findall(_clean(text)):
            if piece in self.specials:
                ids.append(self.specials[piece])
                continue
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids

    def decode(self, ids):
        # every vocabulary entry, specials included, is spelled with byte symbols
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, max_length=None, return_overflow=False):
        """Token ids (B, max_length); with ``return_overflow`` also, per text, the list of BPE token ids
        cut off to fit (empty if nothing was)."""
        if isinstance(texts, str):
            texts = [texts]
        length = max_length or self.max_length
        out = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        overflow = []
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            overflow.append(encoded[length - 2:])
            ids = [self.sot_token_id] + encoded[:length - 2] + [self.eot_token_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return (out, overflow) if return_overflow else out


@lru_cache()
def get_sd1_tokenizer(max_length=77):
    """Shared instance: reading the 1.3 MB BPE file and the merge table takes a moment."""
    return CLIPBPETokenizer(max_length=max_length)
