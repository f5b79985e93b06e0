"""The compositional benchmark: held-out pairs, the shapes detector and its verdicts."""

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dalle1.apps.compose import (
    composition_report,
    defaults_report,
    judge_folder,
    pair_named,
)
from dalle1.data.detect import detect, judge
from dalle1.data.shapes import (
    BACKGROUND,
    COLORS,
    PLACES,
    SHAPES,
    SIZES,
    Shape,
    make_shapes_dataset,
    parse_pairs,
    random_scene,
    render,
)

HOLDOUT = ["red square", "blue triangle", "yellow circle"]


def test_parse_pairs_names_bad_entries():
    assert parse_pairs(HOLDOUT) == {("red", "square"), ("blue", "triangle"), ("yellow", "circle")}
    with pytest.raises(ValueError, match="'pink square'"):
        parse_pairs(["pink square"])
    with pytest.raises(ValueError, match="'red'"):
        parse_pairs(["red"])


def test_held_out_pairs_never_appear_in_any_scene():
    held = parse_pairs(HOLDOUT)
    rng = random.Random(0)
    seen = Counter()
    for _ in range(3000):
        shapes, captions = random_scene(rng, max_shapes=2, holdout=held)
        for s in shapes:
            assert (s.color, s.kind) not in held
            seen[(s.color, s.kind)] += 1
        for line in captions:  # nor in any caption line
            for color, kind in held:
                assert f"{color} {kind}" not in line
    # every other pair does appear, so the benchmark tests composition, not vocabulary
    assert set(seen) == {(c, k) for c in COLORS for k in SHAPES} - held


def test_empty_holdout_draws_the_same_scenes_as_before():
    """Holding nothing out must not change the built-in set (the demo is seeded)."""
    a, b = random.Random(3), random.Random(3)
    for _ in range(200):
        sa, ca = random_scene(a, 2)
        sb, cb = random_scene(b, 2, frozenset())
        assert (sa, ca) == (sb, cb)


def test_dataset_folder_respects_holdout(tmp_path):
    out = make_shapes_dataset(
        tmp_path, 300, 32, seed=1, max_shapes=2, holdout=HOLDOUT, progress=False
    )
    text = " ".join(p.read_text() for p in out.glob("*.txt"))
    for pair in HOLDOUT:
        assert pair not in text
    assert len(list(out.glob("*.png"))) == 300


def test_detector_reads_clean_renders():
    """Self-test: every colour, shape, size and place, 300 renders, >= 99% right."""
    rng = random.Random(1)
    verdicts = []
    for i in range(300):
        color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
        size = "large" if i % 2 else rng.choice(list(SIZES))
        image = render([Shape(color, kind, size, PLACES[rng.choice(list(PLACES))])], 32)
        verdicts.append(judge(image, color, kind))
    assert Counter(verdicts)["ok"] >= 297, Counter(verdicts)


def test_detector_reads_64px_renders_and_positions():
    image = render([Shape("green", "triangle", "large", PLACES["at the top left"])], 64)
    (found,) = detect(image)
    assert (found.color, found.shape) == ("green", "triangle")
    x, y = found.center
    assert x < 32 and y < 32


@pytest.mark.parametrize(
    "shapes, asked, verdict",
    [
        ([Shape("red", "circle", "large", (0.5, 0.5))], ("red", "circle"), "ok"),
        ([Shape("blue", "circle", "large", (0.5, 0.5))], ("red", "circle"), "wrong colour"),
        ([Shape("red", "square", "large", (0.5, 0.5))], ("red", "circle"), "wrong shape"),
        ([Shape("blue", "square", "large", (0.5, 0.5))], ("red", "circle"), "wrong both"),
        (
            [
                Shape("red", "circle", "small", (0.27, 0.5)),
                Shape("blue", "square", "small", (0.73, 0.5)),
            ],
            ("red", "circle"),
            "two objects",
        ),
        ([], ("red", "circle"), "none"),
    ],
)
def test_verdicts_on_hand_made_images(shapes, asked, verdict):
    assert judge(render(shapes, 32), *asked) == verdict


def test_blob_verdict_for_a_shapeless_region():
    image = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    image[8:24, 6:11] = COLORS["red"]  # a tall thin bar: no circle, square or triangle
    image[8:12, 11:26] = COLORS["red"]
    assert judge(Image.fromarray(image), "red", "circle") == "blob"


def _centred(color: str, kind: str) -> Shape:
    return Shape(color, kind, "large", PLACES["in the center"])


def test_judge_folder_counts_a_hand_made_folder(tmp_path):
    """Known answers: two seen pairs drawn right; three never-seen asks, one drawn right,
    one in the wrong colour, one in the wrong shape; one caption naming no pair."""
    drawn = [
        ("red", "circle", "a large red circle in the center"),
        ("blue", "circle", "A large Blue circle, in the center"),
        ("green", "square", "a large red square in the center"),
        ("red", "circle", "a large red square in the center"),
        ("red", "square", "a large red square in the center"),
        ("red", "square", "a picture"),
    ]
    for i, (color, kind, caption) in enumerate(drawn):
        render([_centred(color, kind)], 32).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption + "\n")
    got = judge_folder(tmp_path, HOLDOUT)
    assert got["seen"] == {"accuracy": 1.0, "samples": 2, "failures": {}}
    assert got["unseen"]["samples"] == 3 and got["unseen"]["accuracy"] == pytest.approx(1 / 3)
    assert got["unseen"]["failures"] == {"wrong colour": 1, "wrong shape": 1}
    assert got["skipped"] == 1


class _FakePipe:
    """Draws the asked pair when it was seen, the right shape in green when held out."""

    def __init__(self):
        self.calls = []

    recommended = type("Rec", (), {"describe": lambda self: "plain sampling"})()

    def __call__(self, prompt, num_images, seed, progress, rerank=None, keep=None, options=None):
        self.calls.append((prompt, num_images, rerank, keep, options and options.cond_scale))
        color, kind = pair_named(prompt)
        if (color, kind) in parse_pairs(HOLDOUT):
            color = "green"
        images = [render([_centred(color, kind)], 32)] * (keep or num_images)
        return type("Out", (), {"images": images})()


def test_composition_report_counts_per_group_scale_and_mode():
    pipe = _FakePipe()
    rows = composition_report(pipe, HOLDOUT, [1.0, 3.0], per_prompt=2, rerank_candidates=4)
    assert [r["cond_scale"] for r in rows] == [1.0, 3.0]
    for row in rows:
        for mode in ("plain", "reranked"):
            assert row[f"{mode}_seen"] == {"accuracy": 1.0, "samples": 30, "failures": {}}
            assert row[f"{mode}_unseen"] == {
                "accuracy": 0.0,
                "samples": 6,
                "failures": {"wrong colour": 6},
            }
    # every pair asked in both modes at both scales; reranked draws 4 and keeps 2
    assert len(pipe.calls) == 2 * 2 * 18
    assert ("a large red square in the center", 4, True, 2, 3.0) in pipe.calls


def test_defaults_report_samples_as_the_pipeline_would_by_default():
    pipe = _FakePipe()
    got = defaults_report(pipe, HOLDOUT, per_prompt=3)
    assert got["settings"] == "plain sampling"
    assert got["seen"]["accuracy"] == 1.0 and got["seen"]["samples"] == 45
    assert got["unseen"]["failures"] == {"wrong colour": 9}
    assert all(c[2] is None and c[4] is None for c in pipe.calls)  # no options: the defaults
