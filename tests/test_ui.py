"""dalle1.ui: the functions behind the page, and the page itself in headless Chromium.

The browser test needs the ``ui`` extra (gradio), the ``playwright`` Python
package and Debian's ``chromium`` at /usr/bin/chromium; it is skipped, saying
which one is missing, only when one of them is absent.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dalle1.apps.ui import edit, editor_parts, generate, slider_options
from dalle1.data import find_pairs
from dalle1.editing import parse_box
from dalle1.pipeline import DALLEPipeline
from dalle1.sampling import SamplingOptions

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return DALLEPipeline.from_pretrained(tiny_model)


def test_generate_returns_the_best_of_the_candidates(pipe):
    shown = generate(pipe, "a red circle", num_images=3, seed=4, candidates=6)
    assert len(shown) == 3 and all(isinstance(im, Image.Image) for im, _ in shown)
    everything = pipe("a red circle", num_images=6, seed=4, score=True)
    best = sorted(zip(everything.scores, everything.seeds), reverse=True)[:3]
    for (_, caption), (score, seed) in zip(shown, best):
        assert caption == f"log p/code {score:.3f} · seed {seed}"
    again = generate(pipe, "a red circle", num_images=3, seed=4, candidates=6)
    assert [list(a.getdata()) for a, _ in shown] == [list(b.getdata()) for b, _ in again]
    with pytest.raises(ValueError, match="prompt"):
        generate(pipe, "   ")


def test_slider_values_map_to_sampler_arguments():
    assert slider_options(1, 0, 1.0, 1) == SamplingOptions()
    assert slider_options(0.5, 5.0, 0.9, 2) == SamplingOptions(0.5, 5, 0.9, 2.0)
    assert parse_box("0, 8,16,16") == (0.0, 8.0, 16.0, 16.0)
    with pytest.raises(ValueError, match="four numbers"):
        parse_box("1,2,3")


def test_editor_value_becomes_image_and_mask():
    bg = Image.new("RGB", (16, 16), (10, 20, 30))
    layer = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((8, 8, 15, 15), fill=(255, 0, 0, 128))
    image, mask = editor_parts({"background": bg, "layers": [layer], "composite": bg})
    assert image.getpixel((0, 0)) == (10, 20, 30)
    assert mask.getbbox() == (8, 8, 16, 16) and mask.getpixel((8, 8)) == 255
    assert editor_parts({"background": bg, "layers": [], "composite": bg})[1] is None
    assert editor_parts(None) == (None, None)


def test_edit_keeps_the_codes_outside_the_box(pipe, shapes_dir):
    path = find_pairs(shapes_dir)[0][0]
    image = Image.open(path).convert("RGB")
    size, grid = pipe.vae.cfg.image_size, pipe.vae.grid_size
    shown = edit(pipe, image, "a red circle", box=f"0,{size // 2},{size},{size}", num_images=2)
    assert len(shown) == 2
    out = pipe(
        "a red circle", image=image, box=(0, size // 2, size, size), candidates=2, composite=False
    )
    from dalle1.images import pil_to_tensor

    kept = pipe.vae.encode(pil_to_tensor(image, size)[None])[0][: grid * grid // 2]
    assert all(torch.equal(c[: grid * grid // 2], kept) for c in out.codes)
    # a painted mask over the same half gives the same region
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((0, size // 2, size - 1, size - 1), fill=255)
    painted = edit(pipe, image, "a red circle", mask=mask, num_images=2)
    assert [c for _, c in painted] == [c for _, c in shown]
    with pytest.raises(ValueError, match="box"):
        edit(pipe, image, "a red circle")
    with pytest.raises(ValueError, match="image"):
        edit(pipe, None, "a red circle", box="0,0,4,4")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_generates_the_requested_number_of_images(tiny_model, tmp_path):
    pytest.importorskip("gradio", reason="the ui extra is not installed: pip install 'dalle1[ui]'")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    )
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is absent: apt-get install -y chromium")
    from dalle1.apps.ui import launch

    port = _free_port()
    app = launch(tiny_model, port=port, block=False)
    requests: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                args=CHROMIUM_ARGS,
            )
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#gen-num input[type=number]").fill("3")
            page.locator("#gen-num input[type=number]").press("Enter")
            page.locator("#prompt textarea").fill("a red circle")
            page.locator("#generate").click()
            page.wait_for_function(
                "document.querySelectorAll('#results img').length >= 3", timeout=120_000
            )
            page.wait_for_timeout(500)
            assert page.locator("#results img").count() == 3
            assert "log p/code" in page.locator("#results").inner_text()

            # the editing tab: upload an image, type a box, regenerate candidates
            page.get_by_role("tab", name="Edit").click()
            image = tmp_path / "input.png"
            Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
            upload = page.locator("#editor input[type=file]")
            upload.wait_for(state="attached")
            page.locator("#edit-prompt textarea").fill("a red circle")
            page.locator("#box textarea").fill("0,8,16,16")
            page.locator("#edit-num input[type=number]").fill("2")
            page.locator("#edit-num input[type=number]").press("Enter")
            # The editor hands an upload to the server asynchronously; a click that races
            # ahead of it gets "upload or pick an image first". Re-upload and retry then
            # (bounded), waiting a little longer each time.
            for attempt in range(6):
                upload.set_input_files(str(image))
                page.wait_for_timeout(1000 * (attempt + 1))
                page.locator("#regenerate").click()
                try:
                    page.wait_for_function(
                        "document.querySelectorAll('#edited img').length >= 2", timeout=20_000
                    )
                    break
                except sync_api.TimeoutError:
                    continue
            page.wait_for_timeout(500)
            assert page.locator("#edited img").count() == 2
            browser.close()
    finally:
        app.close()
    hosts = {url.split("/")[2] for url in requests if url.startswith("http")}
    assert hosts == {f"127.0.0.1:{port}"}, f"the page reached out to {hosts}"
