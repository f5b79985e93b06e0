"""dalle1.apps.explain: every picture is drawn, has its size, and the masks are masks.py pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dalle1.apps import explain as ex
from dalle1.checkpoint import load_parts
from dalle1.cli import main
from dalle1.images import make_grid, tensor_to_pil
from dalle1.masks import KINDS, layer_kinds, stream_mask
from dalle1.pipeline import DALLEPipeline


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_parts(tiny_model)


@pytest.fixture(scope="module")
def explained(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    return ex.explain(tiny_model, out, prompt="a red circle", seed=7, progress=False), out


def expected_mask_pixels(mask: torch.Tensor, text_positions: int, scale: int) -> np.ndarray:
    """Built independently of explain.mask_picture: colour per entry, then np.kron-style upscale."""
    m = mask.numpy()
    rgb = np.empty((*m.shape, 3), dtype=np.uint8)
    rgb[:] = ex.MASK_OFF
    is_text = np.arange(m.shape[1]) < text_positions
    rgb[m & is_text[None, :]] = ex.MASK_TEXT
    rgb[m & ~is_text[None, :]] = ex.MASK_IMAGE
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


def test_every_picture_is_written(explained, parts):
    result, out = explained
    _, _, dalle, _ = parts
    kinds = layer_kinds(dalle.cfg.depth, dalle.cfg.attention)
    names = {
        "stream_layout.png",
        "mask_schedule.png",
        "mask_fields.png",
        "raster_order.gif",
        "sample.png",
        "vae_reconstructions.png",
        "codebook_usage.png",
        "loss_curves.png",
        "vae_loss_curves.png",
        *(f"mask_layer{i + 1:02d}_{k}.png" for i, k in enumerate(kinds)),
        *(f"mask_kind_{k}.png" for k in KINDS),
    }
    assert set(result.files) == names and result.skipped == {}
    for name in names:
        assert (out / name).stat().st_size > 0


def test_picture_sizes(explained, parts):
    _, out = explained
    _, vae, dalle, _ = parts
    s = dalle.shape
    size = s.text_len + s.num_codes
    scale = ex.mask_scale(size)
    assert Image.open(out / "stream_layout.png").size == ex.layout_size(s.text_len, s.grid)
    for kind in KINDS:
        assert Image.open(out / f"mask_kind_{kind}.png").size == (size * scale, size * scale)
    gif = Image.open(out / "raster_order.gif")
    assert gif.n_frames == s.num_codes + 1
    side = vae.cfg.image_size * ex._ceil_scale(192, vae.cfg.image_size)
    assert gif.size == (side, side)
    n, px = 8, vae.cfg.image_size  # tiny data set has >= 8 images
    r = ex._ceil_scale(64, px, cap=8)
    grid_w, grid_h = n * (px + 2) + 2, 2 * (px + 2) + 2  # make_grid's 2 px padding
    assert Image.open(out / "vae_reconstructions.png").size == (grid_w * r, grid_h * r)
    assert Image.open(out / "codebook_usage.png").size == ex.HIST_SIZE
    assert Image.open(out / "loss_curves.png").size == ex.CURVES_SIZE
    assert Image.open(out / "vae_loss_curves.png").size == ex.CURVES_SIZE


def test_mask_pictures_match_masks_py_pixel_for_pixel(explained, parts):
    _, out = explained
    _, _, dalle, _ = parts
    s, kernel = dalle.shape, dalle.cfg.conv_kernel
    scale = ex.mask_scale(s.text_len + s.num_codes)
    kinds = layer_kinds(dalle.cfg.depth, dalle.cfg.attention)
    files = [(f"mask_layer{i + 1:02d}_{k}.png", k) for i, k in enumerate(kinds)]
    files += [(f"mask_kind_{k}.png", k) for k in KINDS]
    for name, kind in files:
        mask = stream_mask(kind, s.text_len, s.grid, kernel)
        pixels = np.asarray(Image.open(out / name).convert("RGB"))
        assert np.array_equal(pixels, expected_mask_pixels(mask, s.text_len + 1, scale)), name
        assert torch.equal(ex.picture_to_mask(Image.open(out / name), scale), mask), name
    # the sparse kinds really differ from each other in the pictures
    row = np.asarray(Image.open(out / "mask_kind_row.png"))
    col = np.asarray(Image.open(out / "mask_kind_column.png"))
    assert not np.array_equal(row, col)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_picture_on_paper_like_shapes(kind):
    mask = stream_mask(kind, text_len=5, grid=6, conv_kernel=3)
    pic = ex.mask_picture(mask, 6, scale=3)
    assert np.array_equal(np.asarray(pic), expected_mask_pixels(mask, 6, 3))
    with pytest.raises(ValueError, match="square"):
        ex.mask_picture(mask[:, :-1], 6)


def test_stream_layout_colours_follow_the_tokenizer(parts):
    _, _, dalle, tokenizer = parts
    s = dalle.shape
    prompt = "a"
    ids = tokenizer.encode(prompt)[0]
    kinds = ex.slot_kinds(ids, tokenizer)
    assert kinds[0] == "bos" and "pad" in kinds and "token" in kinds
    img = ex.stream_layout(tokenizer, s, prompt)
    colour = {"bos": ex.BOS_COLOR, "token": ex.TOKEN_COLOR, "pad": ex.PAD_COLOR}
    for slot, kind in enumerate(kinds):
        x0, y0, x1, y1 = ex.text_cell_box(slot)
        assert img.getpixel((x1 - 1, y1 - 1)) == colour[kind], slot
    for j in range(s.num_codes):
        x0, y0, x1, y1 = ex.grid_cell_box(j, s.text_len, s.grid)
        assert img.getpixel((x1 - 1, y1 - 1)) == ex.code_shade(j, s.num_codes)
    # raster order is visible: later codes are darker
    shades = [sum(ex.code_shade(j, s.num_codes)) for j in range(s.num_codes)]
    assert shades == sorted(shades, reverse=True)


def test_raster_frames_reveal_the_sample_code_by_code(tiny_model, parts):
    _, vae, _, _ = parts
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    sample = pipe("a red circle", seed=7)
    frames = ex.raster_frames(vae, sample.codes[0], scale=4)
    n, grid, size = vae.num_codes, vae.grid_size, vae.cfg.image_size
    assert len(frames) == n + 1 and all(f.size == (size * 4, size * 4) for f in frames)
    cell = size // grid * 4
    for t in (0, n // 2, n):
        for j in range(n):
            r, c = divmod(j, grid)
            centre = frames[t].getpixel((c * cell + cell // 2, r * cell + cell // 2))
            if j >= t:
                assert centre == ex.UNSAMPLED
    # the last frame is the decoded sample itself (outside the red outline of the last cell)
    final = tensor_to_pil(vae.decode(sample.codes)[0]).resize((size * 4, size * 4), 0)
    a, b = np.asarray(frames[-1]), np.asarray(final)
    a, b = a[: (grid - 1) * cell], b[: (grid - 1) * cell]
    assert np.array_equal(a, b)
    assert frames[-1].getpixel((size * 4 - 1, size * 4 - 1)) == ex.CURRENT
    assert np.asarray(tensor_to_pil(vae.decode(sample.codes)[0])).shape == (size, size, 3)
    with pytest.raises(ValueError, match="codes"):
        ex.raster_frames(vae, sample.codes[0][:-1])


def test_gif_and_sample_agree_with_the_pipeline(explained, tiny_model):
    _, out = explained
    ref = DALLEPipeline.from_pretrained(tiny_model)("a red circle", seed=7).images[0]
    assert list(Image.open(out / "sample.png").convert("RGB").getdata()) == list(ref.getdata())


def test_reconstructions_put_originals_above_reconstructions(parts, shapes_dir):
    _, vae, _, _ = parts
    from dalle1.data import find_pairs
    from dalle1.images import load_image

    images = torch.stack([load_image(p, vae.cfg.image_size) for p, _ in find_pairs(shapes_dir)[:3]])
    pic = ex.reconstructions_picture(vae, images, scale=1)
    recon = vae.decode(vae.encode(images))
    expected = tensor_to_pil(make_grid(torch.cat([images, recon]), nrow=3))
    assert np.array_equal(np.asarray(pic), np.asarray(expected))


def test_codebook_histogram_counts(parts):
    _, vae, _, _ = parts
    codes = torch.tensor([[0, 0, 0, 1]])
    img = ex.codebook_picture(codes, vae.codebook_size)
    assert img.size == ex.HIST_SIZE
    # exactly two bars: the most used code is three times as tall as the second
    greens = [
        x
        for x in range(img.width)
        if (np.asarray(img)[:, x] == np.array(ex.IMAGE_COLOR)).all(-1).any()
    ]
    heights = {
        x: int((np.asarray(img)[:, x] == np.array(ex.IMAGE_COLOR)).all(-1).sum()) for x in greens
    }
    assert len(set(heights.values())) == 2
    tall, short = max(heights.values()), min(heights.values())
    assert abs(tall / short - 3) < 0.1


def test_loss_curves_from_a_csv(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,image_loss,loss,step,text_loss\n0,4.0,3.75,0,2.0\n0,2.0,1.875,9,1.0\n0,,,19,\n"
    )
    series = ex.read_metrics(log)
    assert series == {
        "image_loss": [(0, 4.0), (9, 2.0)],
        "loss": [(0, 3.75), (9, 1.875)],
        "text_loss": [(0, 2.0), (9, 1.0)],
    }
    img = ex.loss_curves_picture(series, "t")
    assert img.size == ex.CURVES_SIZE
    pixels = np.asarray(img)
    for key in ("text_loss", "image_loss"):
        assert (pixels == np.array(ex.CURVE_COLORS[key])).all(-1).sum() > 50, key
    with pytest.raises(ValueError, match="no loss column"):
        ex.loss_curves_picture({}, "t")


def test_explain_cli(tiny_model, tmp_path, capsys):
    out = tmp_path / "pics"
    assert main(["explain", "--model", str(tiny_model), "--out", str(out), "--schedule-only"]) == 0
    printed = capsys.readouterr().out
    assert "stream_layout.png" in printed and (out / "raster_order.gif").exists()
    assert not (out / "mask_kind_row.png").exists()
    assert main(["explain", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "dalle1 explain: error:" in capsys.readouterr().err
    missing = ["--images", str(tmp_path / "missing.png")]
    assert main(["explain", "--model", str(tiny_model), "--out", str(out), *missing]) == 2
