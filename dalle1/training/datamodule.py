"""The training data of each stage, as two LightningDataModules.

* :class:`ImagesDataModule` — (image, caption) batches for the stages that read
  pixels (``vae``, ``clip``), from listed pairs (folder, manifest) or streamed
  WebDataset shards, plus the held-out images the stage is scored on;
* :class:`CodesDataModule` — (caption ids, codes) batches for the ``dalle``
  stage. DALL-E's transformer only ever sees the dVAE's codes and the dVAE is
  frozen meanwhile (paper section 2.2), so the images are encoded once, in
  ``setup``, or read from a ``dalle1 data encode`` folder (``data.codes``).
  Its captions train the BPE, so the tokenizer comes after ``setup`` and is
  handed over with :meth:`CodesDataModule.connect`.

Training batches are drawn in an order that is a pure function of (seed, epoch,
position), so ``--resume`` continues with the very next batch
(:func:`dalle1.training.resilience.resumable_loader`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..codes import CodesDataset, CodesFile, encode_items
from ..config import Config
from ..data import CaptionedFolder, ShardDataset, iter_items, split_pairs
from ..data.captions import pick_caption
from ..data.colours import ColourLexicon, ColourSwapped, with_colour_swaps
from ..text import TextTokenizer
from ..vae import DiscreteVAE
from .resilience import SeededIndex, resumable_loader


class EncodedCaptions(Dataset):
    """(codes, caption) pairs; the caption line is re-drawn every time."""

    def __init__(self, codes: torch.Tensor, captions: list[list[str]]):
        self.codes, self.captions = codes, captions

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.codes[int(i)], pick_caption(self.captions[i], i)


class FirstCaption(Dataset):
    """Held-out (codes, caption) pairs with each image's first caption line: the same
    figures at every validation pass."""

    def __init__(self, codes: torch.Tensor, captions: list[list[str]]):
        self.codes, self.captions = codes, captions

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.codes[int(i)], (self.captions[i] or [""])[0]


class FixedSeeds(Sampler[int]):
    """Indices 0 … n−1 in order, each carrying a seed of its own (``SeededIndex``), so a
    dataset that draws a caption line draws the same one every pass and never from the
    global generator (validation must leave training's random stream untouched)."""

    def __init__(self, size: int):
        self.size = size

    def __iter__(self):
        return (SeededIndex(i, i) for i in range(self.size))

    def __len__(self) -> int:
        return self.size


def validation_loader(dataset: Dataset | None, config: Config, collate=None) -> DataLoader | list:
    """The held-out batches of a validation pass (in order; no global random draw), or []."""
    if dataset is None:
        return []
    streamed = isinstance(dataset, IterableDataset)
    if not streamed and len(dataset) == 0:
        return []
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=None if streamed else FixedSeeds(len(dataset)),
        collate_fn=collate,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )


def text_collate(tokenizer: TextTokenizer, dropout: bool) -> Callable:
    """(codes, caption) items -> (caption ids (B, L), codes (B, N)); BPE dropout if asked."""

    def collate(items):
        codes = torch.stack([c for c, _ in items])
        return tokenizer.encode([t for _, t in items], dropout=dropout), codes

    return collate


def image_text_collate(tokenizer: TextTokenizer) -> Callable:
    """(image, caption) items -> (images (B, 3, H, W), caption ids (B, L))."""

    def collate(items):
        return torch.stack([im for im, _ in items]), tokenizer.encode([c for _, c in items])

    return collate


def learn_colour_words(config: Config, image_size: int, pairs: list | None) -> ColourLexicon:
    """``data.colour_swaps``: the colour words of the training captions (printed)."""
    lexicon = ColourLexicon.learn(iter_items(config.data, image_size, pairs, shard_split="train"))
    words = ", ".join(lexicon.colours) or "none"
    print(f"dalle1: data: colour words learned from the captions: {words}", file=sys.stderr)
    return lexicon


def _loader(
    dataset: Dataset, config: Config, collate=None, shuffle: bool = True, trainer=None
) -> DataLoader:
    d = config.data
    shuffle = shuffle and not isinstance(dataset, IterableDataset)  # streams shuffle themselves
    if shuffle:  # order = f(seed, epoch, position): --resume continues with the very next batch
        rank, ranks = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return resumable_loader(
            dataset, d.batch_size, config.train.seed, d.num_workers, collate, rank, ranks
        )
    return DataLoader(
        dataset,
        batch_size=d.batch_size,
        shuffle=shuffle,
        num_workers=d.num_workers,
        collate_fn=collate,
        drop_last=shuffle and len(dataset) >= d.batch_size,
        persistent_workers=d.num_workers > 0,
    )


class ImagesDataModule(L.LightningDataModule):
    """(image, caption) batches (caption ids with a ``tokenizer``) and held-out images.

    ``train_pairs`` / ``val_pairs``: the listed split of a folder or manifest, or None
    for WebDataset shards at ``data.path`` (then two hash-filtered streams). With no
    held-out pair, the first ``val_stand_in`` training pairs (None: all) are scored.
    """

    def __init__(
        self,
        config: Config,
        image_size: int,
        train_pairs: list | None,
        val_pairs: list | None,
        tokenizer: TextTokenizer | None = None,
        val_stand_in: int | None = 256,
    ):
        super().__init__()
        self.config, self.image_size = config, image_size
        self.train_pairs, self.val_pairs, self.val_stand_in = train_pairs, val_pairs, val_stand_in
        self.collate = None if tokenizer is None else image_text_collate(tokenizer)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # set up once (Lightning calls this again in fit)
            return
        size = self.image_size
        d = self.config.data
        if self.train_pairs is not None:
            held = self.val_pairs or self.train_pairs[: self.val_stand_in]
            self.train_set = CaptionedFolder(None, size, self.train_pairs)
            self.val_set = CaptionedFolder(None, size, held)
            if d.colour_swaps:  # held-out images stay as they are: they score the stage
                lexicon = learn_colour_words(self.config, size, self.train_pairs)
                base = self.train_set
                self.train_set = ColourSwapped(base, base.captions, lexicon, d.colour_swaps, d.seed)
            return
        if d.colour_swaps:
            print(
                "dalle1: data: data.colour_swaps is not applied to streamed shards in this stage",
                file=sys.stderr,
            )
        self.train_set = ShardDataset(
            d.path,
            size,
            split="train",
            val_fraction=d.val_fraction,
            repeat=True,
            shuffle_buffer=d.shuffle_buffer,
            seed=d.seed,
        )
        val = ShardDataset(
            d.path, size, split="val", val_fraction=d.val_fraction, split_by_rank=False, limit=1024
        )
        if d.val_fraction <= 0 or next(iter(val), None) is None:  # nothing held out: score train
            val = ShardDataset(
                d.path,
                size,
                split="train",
                val_fraction=d.val_fraction,
                split_by_rank=False,
                limit=256,
            )
        self.val_set = val

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.config, self.collate, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        """Validation reads held-out pairs only, never the training stand-in."""
        held = (
            bool(self.val_pairs)
            if self.train_pairs is not None
            else self.config.data.val_fraction > 0
        )
        return validation_loader(self.val_set if held else None, self.config, self.collate)


class CodesDataModule(L.LightningDataModule):
    """(caption ids, codes) batches for the transformer; codes made by the frozen ``vae``.

    Codes come from ``data.codes`` when set (checked against ``dalle.vae``), else from
    one pass of the frozen VAE over the data in :meth:`setup`. After ``setup``:
    ``train_captions`` (caption lines per training row, for the BPE), ``val_codes``
    (held-out codes or None) and ``val_captions``.
    """

    def __init__(
        self,
        config: Config,
        vae: DiscreteVAE,
        train_pairs: list | None,
        val_pairs: list | None,
    ):
        super().__init__()
        self.config, self.vae = config, vae
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.train_set: Dataset | None = None
        self.train_captions: list[list[str]] = []
        self.val_codes: torch.Tensor | None = None
        self.val_captions: list[list[str]] = []
        self.collate: Callable | None = None
        self.lexicon: ColourLexicon | None = None  # data.colour_swaps: the learned colour words
        self.swapped = [0]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # set up once (Lightning calls this again in fit)
            return
        d, vae = self.config.data, self.vae
        if d.codes:
            if d.colour_swaps:
                print(
                    "dalle1: data: data.colour_swaps is ignored with data.codes "
                    "(the images were encoded beforehand)",
                    file=sys.stderr,
                )
            store = CodesFile(d.codes)
            store.check_vae(vae, self.config.dalle.vae)
            train_rows, val_rows = split_pairs(list(range(len(store))), d.val_fraction, d.seed)
            self.train_set = CodesDataset(store, train_rows)
            self.train_captions = [store.captions[i] for i in train_rows]
            self.val_codes = store.tensor(val_rows) if val_rows else None
            self.val_captions = [store.captions[i] for i in val_rows]
            return
        size, train_pairs = vae.cfg.image_size, self.train_pairs
        items = iter_items(d, size, train_pairs, shard_split="train")
        if d.colour_swaps:
            items = self._colour_swaps(items, size)
        codes, self.train_captions = encode_items(
            vae,
            items,
            progress=self.config.train.progress_bar,
            total=None if train_pairs is None or d.colour_swaps else len(train_pairs),
        )
        if d.colour_swaps:
            print(
                f"dalle1: data: {self.swapped[0]} recoloured copies added "
                f"({len(codes)} training rows)",
                file=sys.stderr,
            )
        if self.val_pairs or (train_pairs is None and d.val_fraction > 0):
            items = list(iter_items(d, size, self.val_pairs, shard_split="val"))
            if items:
                self.val_codes, self.val_captions = encode_items(vae, items, progress=False)
        self.train_set = EncodedCaptions(codes, self.train_captions)

    def _colour_swaps(self, items, size: int):
        """``data.colour_swaps``: learn the colour words, then add recoloured copies."""
        d = self.config.data
        self.lexicon = learn_colour_words(self.config, size, self.train_pairs)
        self.swapped = [0]
        return with_colour_swaps(items, self.lexicon, d.colour_swaps, d.seed, self.swapped)

    def caption_lines(self) -> list[str]:
        """Every caption line of the training rows (what the BPE is trained on)."""
        return [c for lines in self.train_captions for c in lines]

    def connect(self, tokenizer: TextTokenizer) -> None:
        """Hand over the tokenizer trained on :meth:`caption_lines` (BPE dropout on)."""
        self.collate = text_collate(tokenizer, dropout=True)
        self.val_collate = text_collate(tokenizer, dropout=False)

    def train_dataloader(self) -> DataLoader:
        if self.collate is None:
            raise RuntimeError("CodesDataModule.connect(tokenizer) must come before training")
        return _loader(self.train_set, self.config, self.collate, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_codes is None or self.collate is None:
            return []
        return validation_loader(
            FirstCaption(self.val_codes, self.val_captions), self.config, self.val_collate
        )
