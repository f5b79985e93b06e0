"""Colour words learned from the data, and recolouring that keeps captions true.

Two augmentations that help a small model draw colour × shape pairs it never saw
(docs/quality.md measures both):

* :func:`random_hue` — rotate every colour of an image about the grey axis by a
  random angle. For the image tokenizer (``vae.hue_augment``): it then learns codes
  for every colour on every shape, including pairs the data never shows together.
  Captions are not involved: the tokenizer never reads them.
* :class:`ColourLexicon` — for ``data.colour_swaps``, in both stages: the image
  tokenizer then has codes for colour × shape pairs the data never shows together, and
  the transformer learns to bind each colour word to whatever shape the caption names.
  Its captions must stay true. It finds the caption words that name a colour *from the data*:
  a word is a colour word when the images whose captions hold it concentrate their
  coloured pixels on one hue far more than images in general do (nothing is
  hard-coded, so "rouge", "teal" or "crimson" are found as readily as "red").
  :meth:`ColourLexicon.swap` then recolours an image so that one of its colour words'
  colour becomes another colour word's, and rewrites the caption to match; an image
  whose other colour words would not land on a known colour is left alone.

Pixels are split into a grey level ``g`` (the mean of R, G, B) and a chroma vector
``c`` in the plane orthogonal to grey. A recolouring rotates and scales ``c`` and lifts
``g`` in proportion to ``|c|``, which maps the source colour's prototype exactly onto
the target's, leaves grey and white pixels alone, and maps anti-aliased blends of a
colour with a grey background onto the same blends of the new colour.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .captions import pick_caption

# an orthonormal basis of the plane orthogonal to grey (1, 1, 1) in RGB
_U = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
_V = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)

HUE_BINS = 36  # 10 degrees each
MIN_CHROMA = 0.1  # pixels with less chroma count as grey (background, white, black)
WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script


def grey_and_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, 3, H, W) in [0, 1] -> grey level (…, H, W) and chroma (…, 2, H, W)."""
    g = images.mean(-3)
    u = torch.einsum("c,...chw->...hw", _U.to(images), images)
    v = torch.einsum("c,...chw->...hw", _V.to(images), images)
    return g, torch.stack([u, v], -3)


def from_grey_and_chroma(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`grey_and_chroma` (clamped to [0, 1])."""
    basis = torch.stack([_U, _V]).to(c)  # (2, 3)
    rgb = g.unsqueeze(-3) + torch.einsum("...khw,kc->...chw", c, basis)
    return rgb.clamp(0, 1)


def random_hue(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate the hue of every image of (B, 3, H, W) by its own uniform random angle."""
    angle = torch.rand(len(images), generator=generator).to(images.device) * 2 * math.pi
    g, c = grey_and_chroma(images)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c[:, 0], c[:, 1]
    return from_grey_and_chroma(g, torch.stack([cos * u - sin * v, sin * u + cos * v], 1))


@dataclass(frozen=True)
class Colour:
    """A colour word's prototype: its grey level and chroma vector (u, v)."""

    grey: float
    u: float
    v: float

    @property
    def chroma(self) -> float:
        return math.hypot(self.u, self.v)

    @property
    def hue(self) -> float:
        return math.atan2(self.v, self.u)

    def rgb(self) -> tuple[float, float, float]:
        x = from_grey_and_chroma(
            torch.tensor([[[self.grey]]]), torch.tensor([[[self.u]], [[self.v]]])
        )
        return tuple(x.flatten().tolist())


HUE_WIDTH = math.radians(12)  # how sharply a pixel belongs to the nearest source hue


def _angle(a: torch.Tensor | float) -> torch.Tensor | float:
    """Wrap angles to (-pi, pi]."""
    return (a + math.pi) % (2 * math.pi) - math.pi


@dataclass(frozen=True)
class Recolour:
    """Sends each ``sources[k]`` colour exactly onto ``targets[k]``.

    Per source colour: rotate and scale the chroma, lift the grey in proportion to the
    chroma (so blends with grey map onto the same blends). A pixel takes the transform
    of the source hue nearest its own hue (softly, over ``HUE_WIDTH``), so a caption
    with several colour words can send each to its own new colour.
    """

    sources: tuple[Colour, ...]
    targets: tuple[Colour, ...]

    def _params(self) -> torch.Tensor:
        """(K, 4): source hue, rotation, chroma scale and grey lift of each pair."""
        return torch.tensor(
            [
                [s.hue, _angle(t.hue - s.hue), t.chroma / s.chroma, (t.grey - s.grey) / s.chroma]
                for s, t in zip(self.sources, self.targets)
            ]
        )

    def apply_gc(self, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grey (B, H, W) and chroma (B, 2, H, W) -> the recoloured pair."""
        params = self._params().to(c)
        hue = torch.atan2(c[:, 1], c[:, 0])  # noisy where chroma ~ 0, harmless there
        distance = _angle(hue[..., None] - params[:, 0])  # (B, H, W, K)
        weight = (-(distance**2) / (2 * HUE_WIDTH**2)).softmax(-1)
        rotation, scale, lift = ((weight * params[:, i]).sum(-1) for i in (1, 2, 3))
        chroma = c.norm(dim=1)
        cos, sin = torch.cos(rotation) * scale, torch.sin(rotation) * scale
        u, v = c[:, 0], c[:, 1]
        return g + lift * chroma, torch.stack([cos * u - sin * v, sin * u + cos * v], 1)

    def colour(self, c: Colour) -> Colour:
        """Where this recolouring sends a prototype colour."""
        g, ch = self.apply_gc(torch.tensor([[[c.grey]]]), torch.tensor([[[[c.u]], [[c.v]]]]))
        return Colour(float(g), float(ch[0, 0]), float(ch[0, 1]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Recolour (B, 3, H, W) or (3, H, W) images in [0, 1]."""
        single = images.ndim == 3
        batch = images[None] if single else images
        out = from_grey_and_chroma(*self.apply_gc(*grey_and_chroma(batch)))
        return out[0] if single else out


def caption_words(lines: Iterable[str]) -> set[str]:
    return {w.lower() for line in lines for w in WORD.findall(line)}


class ColourLexicon:
    """Caption words that name a colour, each with its prototype (see the module docstring)."""

    def __init__(self, colours: dict[str, Colour]):
        self.colours = dict(colours)

    def __len__(self) -> int:
        return len(self.colours)

    def __repr__(self) -> str:
        return f"ColourLexicon({', '.join(sorted(self.colours))})"

    @classmethod
    def learn(
        cls,
        items: Iterable[tuple[torch.Tensor, list[str]]],
        max_images: int = 4000,
        min_images: int = 20,
        lift: float = 2.0,
        presence: float = 0.9,
    ) -> ColourLexicon:
        """Find the colour words of (image (3, H, W), caption lines) pairs.

        A word qualifies when, over the (at least ``min_images``) images whose captions
        hold it, the share of coloured pixels in some 30° hue band is at least ``lift``
        times that band's share over all images, and at least ``presence`` of those
        images show that hue at all (a colour word's images always do; "above" or
        "circle" images only sometimes). Its prototype is the mean colour of the most
        saturated pixels in that band.
        """
        images, words = [], []
        for image, lines in items:
            images.append(image)
            words.append(caption_words(lines))
            if len(images) >= max_images:
                break
        if not images:
            return cls({})
        g, c = grey_and_chroma(torch.stack(images))
        chroma = c.norm(dim=1)
        coloured = chroma > MIN_CHROMA
        hue = torch.atan2(c[:, 1], c[:, 0])
        bins = ((hue + math.pi) / (2 * math.pi) * HUE_BINS).long().clamp(0, HUE_BINS - 1)
        weight = coloured.float()
        per_image = torch.zeros(len(images), HUE_BINS).scatter_add_(
            1, bins.flatten(1), weight.flatten(1)
        )
        per_image = per_image / per_image.sum(1, keepdim=True).clamp_min(1)
        overall = per_image.mean(0).clamp_min(1e-6)
        rows = defaultdict(list)
        for i, ws in enumerate(words):
            for w in ws:
                rows[w].append(i)
        found = {}
        for word, index in rows.items():
            if len(index) < min_images:
                continue
            band = per_image[index] + per_image[index].roll(1, 1) + per_image[index].roll(-1, 1)
            ratio = band.mean(0) / (overall + overall.roll(1) + overall.roll(-1))
            peak = int(ratio.argmax())
            shows = (band[:, peak] > 0.05).float().mean()
            if ratio[peak] < lift or shows < presence:
                continue
            near = (bins[index] - peak).remainder(HUE_BINS)
            mask = coloured[index] & ((near <= 1) | (near >= HUE_BINS - 1))
            strong = chroma[index][mask]
            pick = strong >= 0.9 * strong.quantile(0.95)  # the flat interior, not the edges
            cw = c[index].permute(0, 2, 3, 1)[mask][pick]
            found[word] = Colour(float(g[index][mask][pick].mean()), *cw.mean(0).tolist())
        return cls(found)

    def nearest(self, colour: Colour, tolerance: float = 0.12) -> str | None:
        """The colour word whose prototype lies within ``tolerance`` (RGB distance) of ``colour``."""
        best, distance = None, tolerance
        rgb = torch.tensor(colour.rgb())
        for word, proto in self.colours.items():
            d = float((torch.tensor(proto.rgb()) - rgb).norm())
            if d <= distance:
                best, distance = word, d
        return best

    def swap(
        self, lines: list[str], rng: random.Random, min_separation: float = math.radians(40)
    ) -> tuple[Recolour, list[str]] | None:
        """A recolouring of an image with these caption lines, and the rewritten lines.

        The caption's colour words are sent to distinct colour words drawn at random (at
        least one of them changes). None — leave the image as it is — when the caption
        names no colour word, or two of its colours are too close in hue (under
        ``min_separation``) for each pixel to be told to which one it belongs. Words are
        replaced whole and case-insensitively, keeping the rest of the line.
        """
        present = sorted(caption_words(lines) & set(self.colours))
        if not present or len(self.colours) < 2:
            return None
        hues = [self.colours[w].hue for w in present]
        for i, a in enumerate(hues):
            if any(abs(_angle(a - b)) < min_separation for b in hues[i + 1 :]):
                return None
        while True:
            targets = rng.sample(sorted(self.colours), len(present))
            if targets != present:
                break
        mapping = dict(zip(present, targets))
        recolour = Recolour(
            tuple(self.colours[w] for w in present), tuple(self.colours[w] for w in targets)
        )

        def rename(match: re.Match) -> str:
            new = mapping.get(match.group(0).lower())
            if new is None:
                return match.group(0)
            return new.capitalize() if match.group(0)[0].isupper() else new

        return recolour, [WORD.sub(rename, line) for line in lines]

    def to_dict(self) -> dict[str, list[float]]:
        """{word: [r, g, b]} of the prototypes, for logs and the model folder."""
        return {w: [round(x, 4) for x in c.rgb()] for w, c in sorted(self.colours.items())}


def with_colour_swaps(
    items: Iterable[tuple[torch.Tensor, list[str]]],
    lexicon: ColourLexicon,
    copies: int,
    seed: int = 0,
    counter: list[int] | None = None,
) -> Iterable[tuple[torch.Tensor, list[str]]]:
    """Each (image, caption lines) item, followed by up to ``copies`` recoloured copies.

    A copy is made only where :meth:`ColourLexicon.swap` finds a recolouring, so an
    image whose caption names no colour is never changed. ``counter[0]`` counts the
    copies made. Deterministic in ``seed`` and the order of ``items``.
    """
    rng = random.Random(seed)
    for image, lines in items:
        yield image, lines
        for _ in range(copies):
            swap = lexicon.swap(list(lines), rng)
            if swap is None:
                break
            recolour, new_lines = swap
            if counter is not None:
                counter[0] += 1
            yield recolour(image), new_lines


class ColourSwapped(Dataset):
    """A dataset of (image, caption) pairs, each followed by ``copies`` recoloured copies.

    Item ``i`` is base item ``i // (copies + 1)``; the copies are drawn by
    :meth:`ColourLexicon.swap` with a generator seeded by ``(seed, i)``, so an item is
    the same in every epoch and every process. ``lines[b]`` are the caption lines of
    base item ``b``; where no swap applies (no colour word) the copy is the original.
    """

    def __init__(
        self,
        base: Dataset,
        lines: list[list[str]],
        lexicon: ColourLexicon,
        copies: int,
        seed: int = 0,
    ):
        self.base, self.lines, self.lexicon = base, lines, lexicon
        self.copies, self.seed = copies, seed

    def __len__(self) -> int:
        return len(self.base) * (self.copies + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        b, k = divmod(int(i), self.copies + 1)
        image, caption = self.base[b]
        if k == 0:
            return image, caption
        swap = self.lexicon.swap(self.lines[b], random.Random(self.seed * 1_000_003 + int(i)))
        if swap is None:
            return image, caption
        recolour, lines = swap
        return recolour(image), pick_caption(lines, int(i))
