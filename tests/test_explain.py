"""dalle1.apps.explain: every picture is drawn for a dense and a `dalle` model, titled and
sized; the masks are masks.py cell for cell at the paper's grid and the model's; the
codebook tiles are the VAE's decode; the notebook docs/tour.ipynb runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle1.apps.explain import attention as att
from dalle1.apps.explain import curves, explain, figures, generation, stream, tokens
from dalle1.checkpoint import load_parts
from dalle1.cli import main
from dalle1.config import load_config
from dalle1.data import find_pairs
from dalle1.images import load_image, tensor_to_pil, to_uint8
from dalle1.masks import KINDS, image_mask, layer_kinds, stream_mask
from dalle1.pipeline import DALLEPipeline
from dalle1.sampling import SamplingOptions
from dalle1.training import fit

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(sweep_images=2, candidates=4, keep=2, num_recon=3, num_usage=16)


@pytest.fixture(scope="module")
def dense_model(tiny_model, tmp_path_factory, shapes_dir):
    """The tiny transformer again, trained with `attention: dense` on the same VAE."""
    vae = load_parts(tiny_model)[0].dalle.vae
    out = tmp_path_factory.mktemp("tiny_dense")
    cfg = load_config(
        "configs/tiny_dalle.yaml",
        [
            f"data.path={shapes_dir}",
            f"train.out_dir={out}",
            f"dalle.vae={vae}",
            "dalle.attention=dense",
        ],
    )
    return fit(cfg)


@pytest.fixture(scope="module")
def models(tiny_model, dense_model):
    return {"dalle": tiny_model, "dense": dense_model}


@pytest.fixture(scope="module")
def explained(models, tmp_path_factory):
    """explain() once per model: {attention: (Explained, out folder, model folder)}."""
    done = {}
    for attention, folder in models.items():
        out = tmp_path_factory.mktemp(f"explain_{attention}")
        result = explain(folder, out, prompt="a red circle", seed=7, progress=False, **SMALL)
        done[attention] = (result, out, folder)
    return done


def expected_names(depth: int, attention: str) -> set[str]:
    kinds = layer_kinds(depth, attention)
    return {
        "stream_layout.png",
        "mask_figure11.png",
        "mask_schedule.png",
        "mask_fields.png",
        "raster_order.gif",
        "sample.png",
        "guidance_sweep.png",
        "sampling_sweep.png",
        "rerank.png",
        "edit.png",
        "vae_reconstructions.png",
        "codebook.png",
        "codes.png",
        "codebook_usage.png",
        "loss_curves.png",
        "vae_loss_curves.png",
        *(f"mask_layer{i + 1:02d}_{k}.png" for i, k in enumerate(kinds)),
        *(f"mask_kind_{k}.png" for k in KINDS),
    }


@pytest.mark.parametrize("attention", ["dalle", "dense"])
def test_every_picture_is_written(explained, attention):
    result, out, folder = explained[attention]
    dalle = load_parts(folder)[2]
    assert dalle.cfg.attention == attention
    assert set(result.files) == expected_names(dalle.cfg.depth, attention)
    assert result.skipped == {}
    for name in result.files:
        assert (out / name).stat().st_size > 0


def drawn_title_band(img: Image.Image) -> bool:
    """Dark pixels in the top 40 rows: a heading is drawn there."""
    top = np.asarray(img.convert("RGB"))[:40].astype(int)
    return bool((top.sum(-1) < 200).sum() > 50)


@pytest.mark.parametrize("attention", ["dalle", "dense"])
def test_every_picture_has_a_title(explained, attention):
    result, out, _ = explained[attention]
    for name in result.files:
        if name == "sample.png":  # the sample itself, as sample.py writes it
            continue
        img = Image.open(out / name)
        heading = img.info["comment"].decode() if name.endswith(".gif") else img.text["Title"]
        assert len(heading) > 10, name
        assert drawn_title_band(img), name


@pytest.mark.parametrize("attention", ["dalle", "dense"])
def test_picture_sizes(explained, attention):
    result, out, folder = explained[attention]
    _, vae, dalle, _ = load_parts(folder)
    s, size = dalle.shape, vae.cfg.image_size
    assert Image.open(out / "stream_layout.png").size == stream.layout_size(s.text_len, s.grid)
    gif = Image.open(out / "raster_order.gif")
    scale = figures.ceil_scale(192, size)
    assert gif.n_frames == s.num_codes + 1
    assert gif.size == generation.frame_geometry(size, scale)[:2]
    assert Image.open(out / "loss_curves.png").size == curves.CURVES_SIZE
    assert Image.open(out / "vae_loss_curves.png").size == curves.CURVES_SIZE
    # mask panels: one picture pixel per [query, key] at the paper's shape, whole upscales else
    for name, panels in result.panels.items():
        img = Image.open(out / name)
        for p in panels:
            x0, y0, x1, y1 = p.box
            assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height, name
            n = p.stream.grid if p.field_query is not None else p.stream.size
            assert (x1 - x0) == (y1 - y0) and (x1 - x0) % n == 0, name
            if p.stream == att.PAPER and p.field_query is None:
                assert x1 - x0 == 1280, name
    # mosaics: every image cell is the model's image size times the picture's scale
    image_scale = figures.ceil_scale(64, size, cap=8)
    rows_cols = {
        "guidance_sweep.png": (6, SMALL["sweep_images"]),
        "sampling_sweep.png": (
            len(generation.sampling_settings(s.image_vocab, SamplingOptions())),
            2,
        ),
        "rerank.png": (1, SMALL["candidates"]),
        "vae_reconstructions.png": (2, SMALL["num_recon"]),
    }
    for name, (rows, cols) in rows_cols.items():
        boxes = result.boxes[name]
        assert len(boxes) == rows and all(len(r) == cols for r in boxes), name
        for row in boxes:
            for x0, y0, x1, y1 in row:
                assert (x1 - x0, y1 - y0) == (size * image_scale, size * image_scale), name


# --- the masks, cell for cell ------------------------------------------------------------


def mask_colours(mask: torch.Tensor, text_positions: int) -> np.ndarray:
    """Built here, independently of explain: the colour each [query, key] cell must have."""
    m = mask.numpy()
    rgb = np.empty((*m.shape, 3), dtype=np.uint8)
    rgb[:] = figures.MASK_OFF
    is_text = np.arange(m.shape[1]) < text_positions
    rgb[m & is_text[None, :]] = figures.TOKEN_COLOR
    rgb[m & ~is_text[None, :]] = figures.IMAGE_COLOR
    return rgb


def transposed(mask: torch.Tensor, text_len: int, grid: int) -> torch.Tensor:
    """The image part of a stream mask with grid rows and columns swapped (written here again)."""
    n_text = text_len + 1
    index = list(range(n_text))
    for j in range(grid * grid - 1):
        r, c = divmod(j, grid)
        index.append(n_text + c * grid + r)
    index = torch.tensor(index)
    return mask[index][:, index]


def check_stream_panel(img: Image.Image, panel: att.Panel) -> None:
    s = panel.stream
    mask = stream_mask(panel.kind, s.text_len, s.grid, s.conv_kernel)
    if panel.transposed:
        mask = transposed(mask, s.text_len, s.grid)
    got = panel.read(img)
    assert np.array_equal(got, mask_colours(mask, s.text_len + 1)), (panel.kind, s)


def check_field_panel(img: Image.Image, panel: att.Panel) -> None:
    s, q = panel.stream, panel.field_query
    seen = image_mask(panel.kind, s.grid, s.conv_kernel)[q].view(s.grid, s.grid).numpy()
    want = np.empty((s.grid, s.grid, 3), dtype=np.uint8)
    want[:] = figures.HIDDEN
    want[seen] = figures.IMAGE_COLOR
    want[(np.arange(s.grid**2) > q).reshape(s.grid, s.grid)] = figures.FUTURE
    want[q // s.grid, q % s.grid] = figures.QUERY_COLOR
    assert np.array_equal(panel.read(img), want), (panel.kind, s)


@pytest.mark.parametrize("attention", ["dalle", "dense"])
def test_mask_pictures_match_masks_py_cell_for_cell(explained, attention):
    result, out, folder = explained[attention]
    dalle = load_parts(folder)[2]
    model = (dalle.shape.text_len, dalle.shape.grid, dalle.cfg.conv_kernel)
    paper = (256, 32, 11)
    grids_seen = set()
    for name, panels in result.panels.items():
        img = Image.open(out / name)
        for p in panels:
            (check_field_panel if p.field_query is not None else check_stream_panel)(img, p)
            grids_seen.add((p.stream.text_len, p.stream.grid, p.stream.conv_kernel))
    assert {paper, model} <= grids_seen


@pytest.mark.parametrize("attention", ["dalle", "dense"])
def test_layer_pictures_show_the_papers_schedule_and_what_the_model_uses(explained, attention):
    result, _, folder = explained[attention]
    dalle = load_parts(folder)[2]
    depth = dalle.cfg.depth
    paper, used = layer_kinds(depth, "dalle"), layer_kinds(depth, attention)
    model = (dalle.shape.text_len, dalle.shape.grid, dalle.cfg.conv_kernel)
    for i in range(depth):
        panels = result.panels[f"mask_layer{i + 1:02d}_{used[i]}.png"]
        shown = [(p.kind, (p.stream.text_len, p.stream.grid, p.stream.conv_kernel)) for p in panels]
        want = [(paper[i], (256, 32, 11)), (paper[i], model)]
        if attention == "dense":
            want.append(("dense", model))
        assert shown == want
    # the schedule: a row per (paper at 32x32, `dalle` at the model's grid[, what it uses])
    schedule = result.panels["mask_schedule.png"]
    rows = 2 if attention == "dalle" else 3
    assert len(schedule) == rows * depth
    assert [p.kind for p in schedule[:depth]] == paper
    assert [p.kind for p in schedule[-depth:]] == used


def test_figure11_is_the_papers_setting():
    picture = att.figure11_picture()
    assert [(p.kind, p.transposed) for p in picture.panels] == [
        ("row", False),
        ("column", False),
        ("column", True),
        ("conv", False),
    ]
    for p in picture.panels:
        assert (p.stream.text_len, p.stream.grid, p.stream.conv_kernel) == (6, 4, 3)
        check_stream_panel(picture.image, p)


def test_a_kernel_covering_the_grid_is_said_to_equal_dense():
    small = att.Stream(4, 4, 11, "small")
    assert att.same_as_dense("conv", small) == torch.equal(
        image_mask("conv", 4, 11), image_mask("dense", 4, 11)
    )
    if att.same_as_dense("conv", small):
        assert "= dense" in att.kind_note("conv", small)
    assert "= dense" not in att.kind_note("row", att.PAPER)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_raster_upscales_each_cell(kind):
    mask = stream_mask(kind, text_len=5, grid=6, conv_kernel=3)
    raster = att.mask_raster(mask, 6, scale=3)
    assert np.array_equal(raster, mask_colours(mask, 6).repeat(3, 0).repeat(3, 1))
    assert torch.equal(att.colours_to_mask(raster[1::3, 1::3]), mask)
    with pytest.raises(ValueError, match="square"):
        att.mask_raster(mask[:, :-1], 6)


# --- the tokenizer pictures ----------------------------------------------------------------


def test_codebook_tiles_equal_the_vae_decode_of_each_code(explained):
    result, out, folder = explained["dalle"]
    _, vae, _, _ = load_parts(folder)
    grid, size = vae.grid_size, vae.cfg.image_size
    px = size // grid
    tiles = tokens.codebook_tiles(vae)
    assert tiles.shape == (vae.codebook_size, 3, px, px)
    assert torch.allclose(tokens.codebook_tiles(vae, batch=7), tiles, atol=1e-6)  # batches
    for code in range(vae.codebook_size):
        whole = vae.decode(torch.full((1, grid * grid), code))[0]
        r0 = (grid // 2) * px
        # the same decode one code at a time (batched convolutions differ in the last bits)
        assert torch.allclose(tiles[code], whole[:, r0 : r0 + px, r0 : r0 + px], atol=1e-6)
    # the saved picture holds exactly those tiles, most used first
    img = np.asarray(Image.open(out / "codebook.png").convert("RGB"))
    order = result.codebook_order
    boxes = [b for row in result.boxes["codebook.png"] for b in row]
    assert len(boxes) == len(order) == vae.codebook_size
    data = torch.stack([load_image(p, size) for p, _ in pairs_for(folder)[: SMALL["num_usage"]]])
    counts = torch.bincount(vae.encode(data).flatten(), minlength=vae.codebook_size)
    assert counts[order].tolist() == sorted(counts.tolist(), reverse=True)
    for code, (x0, y0, x1, y1) in zip(order.tolist(), boxes):
        scale = (x1 - x0) // px
        cell = img[y0:y1:scale, x0:x1:scale]
        assert np.array_equal(cell, to_uint8(tiles[code]).permute(1, 2, 0).numpy()), code


def pairs_for(folder: Path) -> list:
    """The pairs explain() uses: the model folder's examples/ (held-out images training
    copied there), else the held-out pairs of its data folder."""
    from dalle1.data import split_pairs

    if (folder / "examples").is_dir():
        return find_pairs(folder / "examples")
    cfg = load_parts(folder)[0]
    train, held = split_pairs(find_pairs(cfg.data.path), cfg.data.val_fraction, cfg.data.seed)
    return held or train


def test_reconstructions_are_originals_above_decode_encode(explained):
    result, out, folder = explained["dense"]
    _, vae, _, _ = load_parts(folder)
    size = vae.cfg.image_size
    images = torch.stack([load_image(p, size) for p, _ in pairs_for(folder)[: SMALL["num_recon"]]])
    recon = vae.decode(vae.encode(images))
    img = np.asarray(Image.open(out / "vae_reconstructions.png").convert("RGB"))
    for row, want in zip(result.boxes["vae_reconstructions.png"], (images, recon)):
        for (x0, y0, x1, y1), image in zip(row, want):
            scale = (x1 - x0) // size
            assert np.array_equal(img[y0:y1:scale, x0:x1:scale], figures.to_rgb_array(image))


def test_cell_errors_add_up_to_the_image_error(tiny_model, shapes_dir):
    _, vae, _, _ = load_parts(tiny_model)
    image = load_image(find_pairs(shapes_dir)[0][0], vae.cfg.image_size)
    codes, recon, per_cell = tokens.cell_errors(vae, image)
    assert torch.equal(codes.flatten(), vae.encode(image[None])[0])
    mse = float(((recon - image) ** 2).mean())
    assert math.isclose(float(per_cell.mean()), mse, rel_tol=1e-5)
    assert per_cell.shape == (vae.grid_size, vae.grid_size)


# --- the generation pictures ---------------------------------------------------------------


def test_guidance_sweep_rows_are_the_pipeline_at_each_scale(explained):
    result, out, folder = explained["dalle"]
    pipe = DALLEPipeline.from_pretrained(folder)
    img = np.asarray(Image.open(out / "guidance_sweep.png").convert("RGB"))
    size = pipe.vae.cfg.image_size
    for row, scale in zip(result.boxes["guidance_sweep.png"], generation.GUIDANCE_SCALES):
        if scale not in (1, 4):
            continue
        want = pipe("a red circle", num_images=SMALL["sweep_images"], seed=7, cond_scale=scale)
        for (x0, y0, x1, y1), pixels in zip(row, want.pixels):
            k = (x1 - x0) // size
            assert np.array_equal(img[y0:y1:k, x0:x1:k], figures.to_rgb_array(pixels)), scale


def test_rerank_picture_is_in_score_order_with_the_kept_framed(explained):
    result, out, folder = explained["dalle"]
    pipe = DALLEPipeline.from_pretrained(folder)
    want = pipe("a red circle", num_images=SMALL["candidates"], seed=7, rerank=True)
    assert want.scores == sorted(want.scores, reverse=True)
    img = np.asarray(Image.open(out / "rerank.png").convert("RGB"))
    size = pipe.vae.cfg.image_size
    boxes = [b for row in result.boxes["rerank.png"] for b in row]
    for i, ((x0, y0, x1, y1), pixels) in enumerate(zip(boxes, want.pixels)):
        k = (x1 - x0) // size
        assert np.array_equal(img[y0:y1:k, x0:x1:k], figures.to_rgb_array(pixels))
        framed = tuple(img[y0 - 2, x0 + 2]) == figures.KEPT_COLOR
        assert framed == (i < SMALL["keep"]), i


def test_edit_picture_shows_the_cells_and_the_ranked_candidates(explained):
    result, out, folder = explained["dense"]
    pipe = DALLEPipeline.from_pretrained(folder)
    size, grid = pipe.vae.cfg.image_size, pipe.vae.grid_size
    image = load_image(pairs_for(folder)[0][0], size)
    box = generation.centre_box(size)
    want = pipe.edit(tensor_to_pil(image), "a red circle", box=box, candidates=8, seed=7)
    assert want.scores == sorted(want.scores, reverse=True)
    roles = generation.cell_roles(want.repaint)
    assert int((roles == 1).sum()) == int(want.repaint.sum()) > 0
    assert (roles == 2).any()  # a box in the middle leaves kept codes after it
    img = np.asarray(Image.open(out / "edit.png").convert("RGB"))
    top, candidates = result.boxes["edit.png"]
    for (x0, y0, x1, y1), pixels in zip(candidates, want.pixels):
        k = (x1 - x0) // size
        assert np.array_equal(img[y0:y1:k, x0:x1:k], figures.to_rgb_array(pixels))
    # the cell map: repainted cells tinted red (a cell in the middle of the box)
    x0, y0, x1, y1 = top[1]
    k = (x1 - x0) // size
    cell = size // grid
    r = c = grid // 2
    centre = img[y0 + (r * cell + cell // 2) * k, x0 + (c * cell + cell // 2) * k]
    assert centre[0] > centre[1] and centre[0] > centre[2]


def test_raster_frames_reveal_the_sample_code_by_code(tiny_model):
    _, vae, _, _ = load_parts(tiny_model)
    pipe = DALLEPipeline.from_pretrained(tiny_model)
    sample = pipe("a red circle", seed=7)
    frames = generation.raster_frames(vae, sample.codes[0], caption="a red circle", scale=4)
    n, grid, size = vae.num_codes, vae.grid_size, vae.cfg.image_size
    width, height, x_off = generation.frame_geometry(size, 4)
    assert len(frames) == n + 1 and all(f.size == (width, height) for f in frames)
    y_off = generation.HEADER_H
    cell = size // grid * 4
    for t in (0, n // 2, n):
        for j in range(t, n):
            r, c = divmod(j, grid)
            centre = (x_off + c * cell + cell // 2, y_off + r * cell + cell // 2)
            assert frames[t].getpixel(centre) == figures.UNSAMPLED
    # the last frame is the decoded sample itself (above the last row, outlined in red)
    final = tensor_to_pil(vae.decode(sample.codes)[0]).resize((size * 4, size * 4), 0)
    a = np.asarray(frames[-1])[y_off : y_off + (grid - 1) * cell, x_off : x_off + size * 4]
    assert np.array_equal(a, np.asarray(final)[: (grid - 1) * cell])
    last = (x_off + size * 4 - 1, y_off + size * 4 - 1)
    assert frames[-1].getpixel(last) == figures.CURRENT
    # the header names the step: frames differ above the image only by their counter
    assert drawn_title_band(frames[1])
    assert not np.array_equal(np.asarray(frames[1])[:y_off], np.asarray(frames[2])[:y_off])
    with pytest.raises(ValueError, match="codes"):
        generation.raster_frames(vae, sample.codes[0][:-1])


def test_stream_layout_colours_follow_the_tokenizer(tiny_model):
    _, _, dalle, tokenizer = load_parts(tiny_model)
    s = dalle.shape
    ids = tokenizer.encode("a")[0]
    kinds = stream.slot_kinds(ids, tokenizer)
    assert kinds[0] == "bos" and "pad" in kinds and "token" in kinds
    img = stream.stream_layout(tokenizer, s, "a")
    colour = {"bos": figures.BOS_COLOR, "token": figures.TOKEN_COLOR, "pad": figures.PAD_COLOR}
    for slot, kind in enumerate(kinds):
        x0, y0, x1, y1 = stream.text_cell_box(slot)
        assert img.getpixel((x1 - 1, y1 - 1)) == colour[kind], slot
    for j in range(s.num_codes):
        x0, y0, x1, y1 = stream.grid_cell_box(j, s.text_len, s.grid)
        assert img.getpixel((x1 - 1, y1 - 1)) == stream.code_shade(j, s.num_codes)
    shades = [sum(stream.code_shade(j, s.num_codes)) for j in range(s.num_codes)]
    assert shades == sorted(shades, reverse=True)


# --- training curves -----------------------------------------------------------------------


def test_loss_curves_read_the_log_and_the_held_out_figures(tmp_path):
    log = tmp_path / "logs" / "metrics.csv"
    log.parent.mkdir()
    log.write_text(
        "epoch,image_loss,loss,step,text_loss,val_image_loss\n"
        "0,4.0,3.75,0,2.0,\n0,2.0,1.875,9,1.0,2.5\n0,,,19,,\n"
    )
    (tmp_path / "metrics.json").write_text(json.dumps({"val_image_bits_per_token": 2.0}))
    series = curves.read_metrics(log)
    assert series == {
        "image_loss": [(0, 4.0), (9, 2.0)],
        "loss": [(0, 3.75), (9, 1.875)],
        "text_loss": [(0, 2.0), (9, 1.0)],
        "val_image_loss": [(9, 2.5)],
    }
    from dalle1.apps.explain.tour import held_out_file

    held = curves.read_held_out(held_out_file(log))
    assert held == {"val_image_bits_per_token": 2.0}
    img = curves.loss_curves_picture(series, "t", ["a line"], held)
    assert img.size == curves.CURVES_SIZE and img.info["title"] == "t"
    pixels = np.asarray(img)
    for key in ("text_loss", "image_loss"):
        assert (pixels == np.array(curves.CURVE_COLORS[key])).all(-1).sum() > 50, key
    with pytest.raises(ValueError, match="no loss column"):
        curves.loss_curves_picture({}, "t")


# --- where explain finds its inputs --------------------------------------------------------


def test_examples_and_logs_inside_the_model_folder_are_used(tiny_model, tmp_path, shapes_dir):
    """A model folder carries examples/ and history/ (training writes them): it explains
    from anywhere; an older folder with only logs/ inside still finds its log."""
    folder = tmp_path / "moved" / "model"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["data"]["path"] = str(tmp_path / "gone")
    (folder / "config.json").write_text(json.dumps(cfg))
    pipe = DALLEPipeline.from_pretrained(folder)
    from dalle1.apps.explain.tour import find_examples, held_out_file, training_log

    found = find_examples(pipe, folder, None, 8)
    assert found.images.shape[0] == 8 and found.source.endswith("examples")
    history = folder / "history"
    assert training_log(folder, None, None) == history / "dalle.csv"
    assert training_log(folder, "vae", None) == history / "vae.csv"
    assert held_out_file(history / "vae.csv") == history / "vae.json"
    assert json.loads((history / "vae.json").read_text())["psnr"] > 0
    shutil.rmtree(history)  # an older folder: the log it carries in logs/
    (folder / "logs").mkdir()
    shutil.copy(Path(tiny_model).parent / "logs" / "metrics.csv", folder / "logs" / "metrics.csv")
    assert training_log(folder, None, None) == folder / "logs" / "metrics.csv"
    assert training_log(folder, "vae", None) is None


def test_explain_cli(tiny_model, tmp_path, capsys):
    out = tmp_path / "pics"
    args = ["explain", "--model", str(tiny_model), "--out", str(out), "--schedule-only"]
    assert main([*args, "--edit-box", "0,0,8,8", "--cond-scale", "2"]) == 0
    printed = capsys.readouterr().out
    assert "stream_layout.png" in printed and (out / "raster_order.gif").exists()
    assert (out / "edit.png").exists() and not (out / "mask_kind_row.png").exists()
    assert main(["explain", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "dalle1 explain: error:" in capsys.readouterr().err
    missing = ["--images", str(tmp_path / "missing.png")]
    assert main(["explain", "--model", str(tiny_model), "--out", str(out), *missing]) == 2


# --- the notebook ----------------------------------------------------------------------------


def test_the_notebook_is_the_script(tmp_path):
    """docs/tour.ipynb is docs/tour.py (jupytext percent format) converted, cell for cell."""
    import jupytext
    import nbformat

    script = jupytext.read(ROOT / "docs" / "tour.py")
    notebook = nbformat.read(ROOT / "docs" / "tour.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in script.cells
    ]
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DALLE1_TOUR_QUICK", "1")  # tiny data and tens of steps
    monkeypatch.setenv("DALLE1_TOUR_DIR", str(tmp_path / "tour"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    notebook = nbformat.read(ROOT / "docs" / "tour.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "docs")}},
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 10  # the pictures are shown, not only written
    assert (tmp_path / "tour" / "dalle" / "model" / "config.json").exists()
