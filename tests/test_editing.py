"""Editing: regions -> cells, kept codes, compositing, completion, variations, candidate scores, CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from dalle1 import DALLEPipeline
from dalle1.cli import main
from dalle1.data.shapes import Shape, render
from dalle1.editing import (
    Frame,
    blend_weights,
    box_to_cells,
    cells_to_pixels,
    completion_cells,
    kept_suffix,
    mask_to_cells,
    variation_cells,
)
from dalle1.images import pil_to_tensor
from dalle1.sampling import sample_codes


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return DALLEPipeline.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def red_circle():
    return render([Shape("red", "circle", "large", (0.5, 0.5))], 16)


def box_mask(w, h, box):
    m = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


# --- regions -> cells (no model) ---------------------------------------------------------


def test_box_cells_by_hand():
    frame = Frame.of(16, 16, 16)  # grid 4: cells of 4x4 pixels
    cells = box_to_cells((0, 0, 5, 5), frame, 4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True  # pixel 4 belongs to the second cell
    assert torch.equal(cells, expected)
    one = box_to_cells((4, 8, 8, 12), frame, 4).view(4, 4)
    assert one.sum() == 1 and one[2, 1]


@pytest.mark.parametrize("size", [(16, 16), (40, 24), (24, 52), (8, 8), (33, 17)])
def test_boxes_and_masks_give_the_same_cells(size):
    w, h = size
    frame = Frame.of(w, h, 16)
    rng = np.random.default_rng(w * 100 + h)
    checked = 0
    for _ in range(60):
        x0, x1 = sorted(rng.choice(w + 1, 2, replace=False))
        y0, y1 = sorted(rng.choice(h + 1, 2, replace=False))
        box = (int(x0), int(y0), int(x1), int(y1))
        try:
            from_box = box_to_cells(box, frame, 4)
        except ValueError as err:  # only the cropped-away margins may select nothing
            assert "outside the centre square" in str(err)
            with pytest.raises(ValueError, match="selects nothing"):
                mask_to_cells(box_mask(w, h, box), frame, 4)
            continue
        assert torch.equal(from_box, mask_to_cells(box_mask(w, h, box), frame, 4))
        assert torch.equal(from_box, mask_to_cells(np.asarray(box_mask(w, h, box)) > 0, frame, 4))
        checked += 1
    assert checked > 20


def test_region_errors_are_one_line():
    frame = Frame.of(16, 16, 16)
    for box, msg in [
        ((5, 5, 5, 9), "empty"),
        ((9, 2, 3, 8), "empty"),
        ((0, 0, 17, 4), "outside the 16x16 image"),
        ((-1, 0, 4, 4), "outside"),
        ((1, 2, 3), "four numbers"),
    ]:
        with pytest.raises(ValueError, match=msg) as err:
            box_to_cells(box, frame, 4)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="outside the centre square"):
        box_to_cells((0, 0, 4, 16), Frame.of(32, 16, 16), 4)  # the left 8 px are cropped away
    with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16"):
        mask_to_cells(Image.new("L", (8, 8), 255), frame, 4)
    with pytest.raises(ValueError, match="selects nothing"):
        mask_to_cells(Image.new("L", (16, 16), 0), frame, 4)


def test_completion_and_variation_cells():
    assert torch.equal(completion_cells(4, rows=1), torch.arange(16) >= 4)
    assert torch.equal(completion_cells(4, start=6), torch.arange(16) >= 6)
    assert completion_cells(32).nonzero()[0].item() == 15 * 32  # the paper's 15 of 32 rows
    with pytest.raises(ValueError, match="rows must be"):
        completion_cells(4, rows=4)
    a, b = variation_cells(8, 0.25, seed=1), variation_cells(8, 0.25, seed=1)
    assert torch.equal(a, b) and a.sum() == 16
    assert not torch.equal(a, variation_cells(8, 0.25, seed=2))
    assert torch.equal(variation_cells(8, 0.25, "lower"), torch.arange(64) >= 48)
    with pytest.raises(ValueError, match="fraction"):
        variation_cells(8, 0.0)


def test_kept_suffix_and_blend_weights():
    repaint = torch.tensor([False, True, False, True, False])
    assert kept_suffix(repaint).tolist() == [False, False, True, False, True]
    assert not kept_suffix(torch.arange(5) >= 2).any()  # completion: nothing kept after
    pixels = cells_to_pixels(torch.tensor([False, True, False, False]), 2, 8)
    assert pixels.sum() == 16 and pixels[:4, 4:].all()
    w = blend_weights(pixels, feather=2)
    assert torch.equal(w[~pixels], torch.zeros(48))
    # Chebyshev distance to the nearest kept pixel d, weight min(d, 3) / 3
    assert w[0, 4].item() == pytest.approx(1 / 3, abs=1e-6)
    assert w[1, 5].item() == pytest.approx(2 / 3, abs=1e-6)
    assert w[2, 6].item() == pytest.approx(2 / 3, abs=1e-6)  # 2 px above the kept row 4
    assert w[0, 7] == 1  # the image border does not count as a kept neighbour
    assert torch.equal(blend_weights(pixels, 0), pixels.float())


# --- editing with the tiny model ---------------------------------------------------------


def test_kept_codes_and_untouched_pixels_are_identical(pipe, red_circle):
    out = pipe.edit(red_circle, "a blue circle", box=(4, 4, 12, 9), candidates=3, seed=2)
    original = pipe.vae.encode(pil_to_tensor(red_circle, 16)[None])[0]
    keep = ~out.repaint
    assert out.repaint.view(4, 4)[1:3, 1:3].all() and out.repaint.sum() == 4
    assert torch.equal(out.original_codes, original)
    assert out.codes.shape == (3, 16)
    assert torch.equal(out.codes[:, keep], original[keep].expand(3, -1))
    px = cells_to_pixels(out.repaint, 4, 16).numpy()
    source = np.asarray(red_circle)
    for im, raw in zip(out.images, out.generated):
        assert np.array_equal(np.asarray(im)[~px], source[~px])
        assert np.array_equal(np.asarray(im)[px], np.asarray(raw)[px])
    plain = pipe.edit(
        red_circle, "a blue circle", box=(4, 4, 12, 9), candidates=3, seed=2, composite=False
    )
    decoded = [np.asarray(im) for im in plain.generated]
    assert [np.asarray(im).tolist() for im in plain.images] == [d.tolist() for d in decoded]
    # __call__ delegates to the same edit
    via_call = pipe("a blue circle", image=red_circle, box=(4, 4, 12, 9), num_images=3, seed=2)
    assert torch.equal(via_call.codes, out.codes) and via_call.scores == out.scores


def test_feathered_compositing_keeps_untouched_pixels(pipe, red_circle):
    out = pipe.edit(red_circle, "a red circle", box=(0, 0, 16, 8), candidates=1, feather=2)
    px = cells_to_pixels(out.repaint, 4, 16).numpy()
    got, src, raw = (
        np.asarray(x, dtype=float) for x in (out.images[0], red_circle, out.generated[0])
    )
    assert np.array_equal(got[~px], src[~px])
    assert np.array_equal(got[:5], raw[:5])  # >= 2 px from the kept rows: fully generated
    row = 7  # next to the kept rows: weight 1/3
    assert np.allclose(got[row], raw[row] / 3 + src[row] * 2 / 3, atol=0.51)


def test_mask_to_the_end_equals_plain_completion(pipe, red_circle):
    p = 6  # not row-aligned: the rest of row 1 and everything below
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:8, 8:] = 255
    mask[8:] = 255
    via_mask = pipe.edit(red_circle, "a green square", mask_image=Image.fromarray(mask), seed=4)
    via_complete = pipe.complete(red_circle, "a green square", start=p, seed=4)
    assert torch.equal(via_mask.repaint, torch.arange(16) >= p)
    assert torch.equal(via_mask.codes, via_complete.codes)
    assert via_mask.scores == [0.0] * 4 and via_mask.seeds == [4, 5, 6, 7]
    original = via_mask.original_codes
    direct = sample_codes(
        pipe.dalle,
        pipe.encode_prompts(["a green square"] * 4),
        generators=[torch.Generator().manual_seed(s) for s in range(4, 8)],
        init_codes=original.expand(4, -1),
        keep=(torch.arange(16) < p).expand(4, -1),
    )
    assert torch.equal(via_complete.codes, direct)
    rows = pipe.complete(red_circle, "a green square", rows=2, seed=4)
    start = pipe.complete(red_circle, "a green square", start=8, seed=4)
    assert torch.equal(rows.codes, start.codes)


def test_candidate_scores_equal_a_separate_forward_pass(pipe, red_circle):
    out = pipe.edit(red_circle, "a blue circle", box=(0, 4, 8, 8), candidates=5, seed=1)
    assert out.repaint.nonzero().flatten().tolist() == [4, 5]
    assert out.scores == sorted(out.scores, reverse=True)
    text = pipe.encode_prompts(["a blue circle"])
    for codes, score in zip(out.codes, out.scores):
        total = 0.0
        for j in range(6, 16):  # every code after the first repainted one is kept here
            logits = pipe.dalle.next_logits_uncached(text, codes[None, :j])
            total += logits.log_softmax(-1)[0, codes[j]].item()
        assert score == pytest.approx(total, abs=1e-4)
    # each candidate is reproducible alone from its seed
    best = pipe.edit(red_circle, "a blue circle", box=(0, 4, 8, 8), candidates=1, seed=out.seeds[0])
    assert torch.equal(best.codes[0], out.codes[0])
    # batching the candidates does not change them
    split = pipe.edit(
        red_circle, "a blue circle", box=(0, 4, 8, 8), candidates=5, seed=1, batch_size=2
    )
    assert torch.equal(split.codes, out.codes) and split.seeds == out.seeds


def test_variations_and_the_empty_caption(pipe, red_circle):
    out = pipe.variations(red_circle, None, fraction=0.25, mask_seed=3, candidates=2, seed=0)
    assert torch.equal(out.repaint, variation_cells(4, 0.25, "random", 3))
    assert torch.equal(out.codes[:, ~out.repaint], out.original_codes[~out.repaint].expand(2, -1))
    assert out.prompts == ["", ""]
    direct = sample_codes(
        pipe.dalle,
        pipe.tokenizer.pad_row()[None].expand(2, -1),
        generators=[torch.Generator().manual_seed(s) for s in range(2)],
        init_codes=out.original_codes.expand(2, -1),
        keep=(~out.repaint).expand(2, -1),
    )
    assert sorted(map(tuple, out.codes.tolist())) == sorted(map(tuple, direct.tolist()))
    lower = pipe.variations(red_circle, "a red circle", fraction=0.5, mode="lower", candidates=1)
    assert torch.equal(lower.repaint, torch.arange(16) >= 8)


def test_pipeline_editing_errors(pipe, red_circle):
    with pytest.raises(ValueError, match="need image="):
        pipe("a red circle", box=(0, 0, 4, 4))
    with pytest.raises(ValueError, match="box= or mask_image="):
        pipe("a red circle", image=red_circle)
    with pytest.raises(ValueError, match="exactly one"):
        pipe.edit(red_circle, "a", box=(0, 0, 4, 4), mask_image=Image.new("L", (16, 16), 255))
    with pytest.raises(ValueError, match="candidates"):
        pipe.edit(red_circle, "a red circle", box=(0, 0, 4, 4), candidates=0)
    with pytest.raises(ValueError, match="one prompt"):
        pipe.edit(red_circle, ["a", "b"], box=(0, 0, 4, 4))


# --- command line ------------------------------------------------------------------------


def test_edit_cli_writes_original_mask_and_candidates(tiny_model, red_circle, tmp_path, capsys):
    red_circle.save(tmp_path / "in.png")
    box_mask(16, 16, (4, 4, 12, 12)).save(tmp_path / "mask.png")
    base = ["--model", str(tiny_model), "--image", str(tmp_path / "in.png"), "--seed", "3"]
    rc = main(
        base
        + ["--prompt", "a blue circle", "--box", "4,4,12,12", "--candidates", "3"]
        + ["--out", str(tmp_path / "a")],
        command_name="edit",
    )
    assert rc == 0
    grid = Image.open(tmp_path / "a/grid.png")
    assert grid.size == ((5 * (16 + 2) + 2) * 4, (16 + 2 + 2) * 4)  # original, mask, 3 results
    assert sorted(p.name for p in (tmp_path / "a").glob("0*.png")) == ["00.png", "01.png", "02.png"]
    assert "score=" in (tmp_path / "a/scores.txt").read_text()
    # the same edit through sample.py's flags and a mask image covering the same pixels
    rc = main(
        base
        + ["--prompt", "a blue circle", "--mask", str(tmp_path / "mask.png")]
        + ["--num-images", "3", "--out", str(tmp_path / "b")],
        command_name="sample",
    )
    assert rc == 0
    for name in ("00.png", "01.png", "02.png", "grid.png"):
        assert (
            Image.open(tmp_path / "a" / name).tobytes()
            == Image.open(tmp_path / "b" / name).tobytes()
        )
    for flags in (["--complete-rows", "1"], ["--variation", "0.5", "--variation-mode", "lower"]):
        assert (
            main(
                base + flags + ["--candidates", "1", "--out", str(tmp_path / "c")],
                command_name="edit",
            )
            == 0
        )
    capsys.readouterr()
    assert (
        main(base + ["--box", "4,4,20,8", "--out", str(tmp_path / "d")], command_name="edit") == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("dalle1 edit: error:") and "outside" in err and len(err.splitlines()) == 1
    assert main(base + ["--box", "1,2,3"], command_name="edit") == 2
    assert "four numbers" in capsys.readouterr().err
    assert main(["--model", str(tiny_model), "--box", "0,0,4,4"], command_name="edit") == 2
    assert "needs --image" in capsys.readouterr().err
