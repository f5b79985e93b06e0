"""The text tokenizer: lowercased byte-level BPE, fixed length, one pad token per position.

DALL-E 1 (paper section 2.2) lowercases captions, encodes them with BPE
(16,384 tokens, 10% BPE dropout in training) and reserves 256 text positions.
A caption shorter than that is padded, and the paper gives every text
position its *own* pad token: position i is padded with ``pad_id(i)``. The
model therefore always knows where in the text slots it is, even inside the
padding, and "no caption at all" (used for classifier-free guidance) is simply
the sequence of all pads.

Ids are laid out as ``[BPE tokens (incl. <unk>, <bos>) | pad_0 … pad_{L-1}]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .files import read_text

BOS = "<bos>"
UNK = "<unk>"


class TextTokenizer:
    """Wraps a ``tokenizers`` BPE model and turns captions into fixed-length id rows."""

    def __init__(self, tokenizer: Tokenizer, text_len: int, bpe_dropout: float = 0.0):
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.bpe_dropout = bpe_dropout
        self.bos_id = tokenizer.token_to_id(BOS)
        if self.bos_id is None:
            raise ValueError(
                f"tokenizer has no '{BOS}' token; train it with dalle1.text.train_tokenizer"
            )
        self.bpe_vocab_size = tokenizer.get_vocab_size()

    # --- construction -----------------------------------------------------------------

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int,
        text_len: int,
        bpe_dropout: float = 0.0,
        lowercase: bool = True,
    ) -> TextTokenizer:
        """Learn a byte-level BPE of ``vocab_size`` tokens (specials included) from captions."""
        normal = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence(normal)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[UNK, BOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(captions), trainer=trainer)
        return cls(tok, text_len, bpe_dropout)

    @classmethod
    def load(
        cls, path: str | Path, text_len: int, bpe_dropout: float = 0.0, root: Path | None = None
    ) -> TextTokenizer:
        """Load a ``tokenizer.json`` (parsed as data, nothing executed; a regular file of at
        most 256 MiB, inside ``root`` if given: :func:`dalle1.files.read_text`)."""
        return cls(Tokenizer.from_str(read_text(path, "tokenizer", root)), text_len, bpe_dropout)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    # --- ids --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the text vocabulary of the transformer: BPE tokens plus one pad per position."""
        return self.bpe_vocab_size + self.text_len

    def pad_id(self, position: int) -> int:
        return self.bpe_vocab_size + position

    def pad_row(self) -> torch.Tensor:
        """The ids of an empty caption: ``pad_0 … pad_{L-1}``."""
        return torch.arange(self.text_len) + self.bpe_vocab_size

    def is_pad(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.bpe_vocab_size

    def encode(self, captions: str | list[str], dropout: bool = False) -> torch.Tensor:
        """Captions -> LongTensor (B, text_len); longer captions are truncated, shorter padded.

        ``dropout=True`` applies BPE dropout (training only; paper: 10%).
        """
        if isinstance(captions, str):
            captions = [captions]
        self.tokenizer.model.dropout = (
            self.bpe_dropout if dropout and self.bpe_dropout > 0 else None
        )
        try:
            encodings = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        finally:
            self.tokenizer.model.dropout = None
        rows = self.pad_row().repeat(len(encodings), 1)
        for row, enc in zip(rows, encodings):
            ids = enc.ids[: self.text_len]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows

    def decode(self, ids: torch.Tensor) -> list[str]:
        """LongTensor (B, text_len) or (text_len,) -> captions; pads are dropped."""
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        keep = [
            [int(i) for i in row if i < self.bpe_vocab_size and i != self.bos_id] for row in ids
        ]
        return [self.tokenizer.decode(row) for row in keep]

    def num_tokens(self, caption: str) -> int:
        """How many BPE tokens a caption takes before truncation."""
        return len(self.tokenizer.encode(caption, add_special_tokens=False).ids)

    def token_counts(self, captions: Iterable[str]) -> list[int]:
        """How many BPE tokens each caption takes before truncation."""
        encodings = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def count_truncated(self, captions: Iterable[str]) -> int:
        """How many captions take more BPE tokens than ``text_len`` (they are cut there)."""
        return sum(n > self.text_len for n in self.token_counts(captions))

    def with_text_len(self, text_len: int) -> TextTokenizer:
        """The same BPE with another number of text positions (and so other pad ids)."""
        return TextTokenizer(self.tokenizer, text_len, self.bpe_dropout)


def auto_text_len(counts: list[int], percentile: float = 99.0) -> int:
    """Text positions for captions of these token counts (``text.text_len: auto``).

    The ``percentile``-th token count (nearest rank) plus a margin of a quarter of it,
    at least 2 slots, so the occasional longer caption still fits. Captions longer than
    that are the rare 1% and are truncated (and counted in the training log).
    """
    if not counts:
        raise ValueError("text.text_len: auto needs captions to size from; the data has none")
    ordered = sorted(counts)
    rank = max(0, math.ceil(percentile / 100 * len(ordered)) - 1)
    p = ordered[rank]
    return max(1, p + max(2, math.ceil(p / 4)))
