"""Colour words learned from data; recolouring that keeps captions true; hue jitter."""

import random

import pytest
import torch

from dalle1.data.colours import (
    ColourLexicon,
    ColourSwapped,
    Recolour,
    from_grey_and_chroma,
    grey_and_chroma,
    random_hue,
)
from dalle1.data.shapes import COLORS, PLACES, Shape, random_scene, render
from dalle1.images import pil_to_tensor


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    items = []
    for _ in range(1500):
        shapes, captions = random_scene(rng, 2)
        items.append((pil_to_tensor(render(shapes, 32), 32), captions))
    return items


@pytest.fixture(scope="module")
def lexicon(scenes):
    return ColourLexicon.learn(scenes)


def centred(color: str, kind: str = "circle") -> torch.Tensor:
    return pil_to_tensor(render([Shape(color, kind, "large", PLACES["in the center"])], 32), 32)


def test_grey_and_chroma_round_trip():
    x = torch.rand(4, 3, 8, 8)
    g, c = grey_and_chroma(x)
    assert g.shape == (4, 8, 8) and c.shape == (4, 2, 8, 8)
    assert torch.allclose(from_grey_and_chroma(g, c), x, atol=1e-6)
    grey = torch.full((1, 3, 2, 2), 0.3)
    assert grey_and_chroma(grey)[1].abs().max() < 1e-6  # grey has no chroma


def test_lexicon_finds_exactly_the_chromatic_colour_words(lexicon):
    """Learned from images and captions alone: the five hues, not 'white' (no hue),
    not shape, size or place words."""
    assert set(lexicon.colours) == {"red", "green", "blue", "yellow", "purple"}
    for word, rgb in lexicon.to_dict().items():
        true = torch.tensor(COLORS[word]) / 255
        assert (torch.tensor(rgb) - true).abs().max() < 0.05, word


def test_lexicon_is_not_tied_to_english(scenes):
    renamed = {"red": "rouge", "blue": "bleu"}
    items = [
        (im, [" ".join(renamed.get(w, w) for w in line.split()) for line in lines])
        for im, lines in scenes
    ]
    assert {"rouge", "bleu"} <= set(ColourLexicon.learn(items).colours)


def test_recolour_maps_one_rendered_colour_onto_another(lexicon):
    for src, dst in (("red", "blue"), ("yellow", "purple"), ("green", "red")):
        out = Recolour((lexicon.colours[src],), (lexicon.colours[dst],))(centred(src, "triangle"))
        assert (out - centred(dst, "triangle")).abs().mean() < 0.01, (src, dst)


def test_recolour_leaves_grey_and_white_alone(lexicon):
    white = centred("white")
    out = Recolour((lexicon.colours["red"],), (lexicon.colours["green"],))(white)
    assert (out - white).abs().max() < 1e-5


def test_swap_rewrites_every_line_consistently(lexicon):
    rng = random.Random(0)
    lines = ["a large red circle at the top", "a red circle", "A Red circle"]
    recolour, new = lexicon.swap(lines, rng)
    target = next(w for w in lexicon.colours if w in new[1].split())
    assert target != "red"
    assert new == [
        f"a large {target} circle at the top",
        f"a {target} circle",
        f"A {target.capitalize()} circle",
    ]
    assert recolour.targets == (lexicon.colours[target],)


def test_swap_of_a_two_colour_caption_recolours_each_object(lexicon):
    """Each colour word goes to its own new colour, and the pixels follow."""
    rng = random.Random(1)
    scene = [
        Shape("red", "square", "small", (0.27, 0.5)),
        Shape("blue", "triangle", "small", (0.73, 0.5)),
    ]
    lines = ["a red square to the left of a blue triangle"]
    for _ in range(5):
        recolour, (line,) = lexicon.swap(lines, rng)
        a, b = line.split()[1], line.split()[-2]
        assert a != b and {a, b} <= set(lexicon.colours) and (a, b) != ("red", "blue")
        want = [
            Shape(a, "square", "small", (0.27, 0.5)),
            Shape(b, "triangle", "small", (0.73, 0.5)),
        ]
        got = recolour(pil_to_tensor(render(scene, 32), 32))
        assert (got - pil_to_tensor(render(want, 32), 32)).abs().mean() < 0.01, line


def test_swap_refuses_colours_too_close_in_hue():
    lex = ColourLexicon({})
    from dalle1.data.colours import Colour

    lex.colours = {
        "scarlet": Colour(0.4, 0.5, 0.0),
        "crimson": Colour(0.4, 0.49, 0.05),
        "blue": Colour(0.4, -0.3, -0.3),
    }
    assert lex.swap(["scarlet and crimson"], random.Random(0)) is None
    assert lex.swap(["scarlet and blue"], random.Random(0)) is not None


def test_swap_leaves_captions_without_colour_words():
    lex = ColourLexicon({})
    assert lex.swap(["a white circle"], random.Random(0)) is None


def test_random_hue_keeps_grey_and_chroma_and_turns_the_hue():
    muted = 0.5 + 0.2 * (torch.rand(2, 3, 8, 8) - 0.5)  # no channel near 0 or 1: nothing clamps
    out = random_hue(muted, torch.Generator().manual_seed(0))
    g0, c0 = grey_and_chroma(muted)
    g1, c1 = grey_and_chroma(out)
    assert torch.allclose(g0, g1, atol=1e-5) and torch.allclose(
        c0.norm(dim=1), c1.norm(dim=1), atol=1e-5
    )
    turn = torch.atan2(c1[:, 1], c1[:, 0]) - torch.atan2(c0[:, 1], c0[:, 0])
    per_image = torch.cos(turn).flatten(1)
    assert torch.allclose(per_image, per_image[:, :1], atol=1e-4)  # one angle per image
    assert (per_image[:, 0] < 0.999).all()
    white = centred("white")[None]
    assert (random_hue(white) - white).abs().max() < 1e-5  # white has no hue to turn


def test_colour_swapped_dataset_adds_true_recoloured_copies(lexicon):
    """Item 0 is the original; its copies draw the colour their captions name; an image
    whose caption names no colour is never changed; items are the same on every draw."""
    base = [(centred("red", "square"), "a red square"), (centred("white"), "a white circle")]
    lines = [["a red square"], ["a white circle"]]
    data = ColourSwapped(base, lines, lexicon, copies=2, seed=3)
    assert len(data) == 6
    assert data[0][1] == "a red square" and torch.equal(data[0][0], base[0][0])
    for i in (1, 2):
        image, caption = data[i]
        colour = caption.split()[1]
        assert colour in lexicon.colours and colour != "red"
        assert caption == f"a {colour} square"
        assert (image - centred(colour, "square")).abs().mean() < 0.01
        again = data[i]
        assert again[1] == caption and torch.equal(again[0], image)
    for i in (3, 4, 5):
        assert data[i][1] == "a white circle" and torch.equal(data[i][0], base[1][0])


@pytest.fixture(scope="module")
def two_shape_folder(tmp_path_factory):
    from dalle1.data import make_shapes_dataset

    root = tmp_path_factory.mktemp("two_shapes")
    return make_shapes_dataset(root, 400, 16, seed=0, max_shapes=2, progress=False)


def test_colour_swaps_in_both_stages(two_shape_folder):
    """data.colour_swaps: the image stage doubles its training set with lazily recoloured
    copies; the transformer stage encodes one copy per image whose caption names a colour."""
    from dalle1.config import Config, DataConfig, VAEConfig
    from dalle1.data import find_pairs
    from dalle1.training.datamodule import CodesDataModule, ImagesDataModule
    from dalle1.vae import DiscreteVAE

    config = Config(data=DataConfig(path=str(two_shape_folder), image_size=16, colour_swaps=1))
    config.train.progress_bar = False
    pairs = find_pairs(two_shape_folder)
    images = ImagesDataModule(config, 16, pairs, [])
    images.setup()
    assert len(images.train_set) == 2 * len(pairs)
    changed = [i for i in range(1, 41, 2) if images.train_set[i][1] != images.train_set[i - 1][1]]
    assert changed, "no recoloured copy among the first 20 images"
    vae = DiscreteVAE(VAEConfig(image_size=16, hidden_dim=8, codebook_size=32, codebook_dim=8))
    codes = CodesDataModule(config, vae.eval(), pairs, [])
    codes.setup()
    coloured = sum(1 for _, c in pairs if set(c.read_text().split()) & set(codes.lexicon.colours))
    assert codes.swapped[0] == coloured > 0
    assert len(codes.train_set) == len(pairs) + coloured
