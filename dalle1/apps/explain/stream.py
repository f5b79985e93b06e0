"""The single token stream of paper section 2.2, drawn for one caption (a PIL diagram).

``<bos>``, then the text slots — BPE tokens of the caption, then a pad token *of its
own per position* — then the grid of image codes in raster order; and the same
stream as the 1-D sequence the transformer reads.
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw

from ...text import TextTokenizer
from ...transformer import StreamShape
from .figures import BACKGROUND, BOS_COLOR, IMAGE_COLOR, INK, PAD_COLOR, TOKEN_COLOR, font

MARGIN = 16
TITLE_H = 28  # a line of heading text
HEAD_H = 2 * TITLE_H + 22  # the title, the caption line and the legend line
CELL_W, CELL_H = 56, 36  # one text slot
CELLS_PER_ROW = 16  # text slots per row before wrapping
STRIP_H = 24  # the 1-D stream strip
LEGEND = [
    (BOS_COLOR, "<bos>"),
    (TOKEN_COLOR, "BPE token of the caption"),
    (PAD_COLOR, "pad token of that position"),
    (IMAGE_COLOR, "image code (darker = later in raster order)"),
]


def grid_cell_px(grid: int) -> int:
    """Side in pixels of one image-code cell in the stream-layout picture."""
    return max(8, min(40, 320 // grid))


def text_cell_box(slot: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of text slot ``slot`` (0 = ``<bos>``) in the layout picture."""
    row, col = divmod(slot, CELLS_PER_ROW)
    x0 = MARGIN + col * CELL_W
    y0 = MARGIN + HEAD_H + TITLE_H + row * CELL_H
    return x0, y0, x0 + CELL_W - 2, y0 + CELL_H - 2


def _text_rows(text_len: int) -> int:
    return math.ceil((text_len + 1) / CELLS_PER_ROW)


def grid_cell_box(index: int, text_len: int, grid: int) -> tuple[int, int, int, int]:
    """Pixel box of image code ``index`` (raster order) in the layout picture."""
    g = grid_cell_px(grid)
    r, c = divmod(index, grid)
    top = MARGIN + HEAD_H + TITLE_H + _text_rows(text_len) * CELL_H + TITLE_H
    x0, y0 = MARGIN + c * g, top + r * g
    return x0, y0, x0 + g - 2, y0 + g - 2


def layout_size(text_len: int, grid: int) -> tuple[int, int]:
    """(width, height) of the stream-layout picture."""
    g = grid_cell_px(grid)
    width = 2 * MARGIN + max(min(text_len + 1, CELLS_PER_ROW) * CELL_W, grid * g, 720)
    height = (
        MARGIN
        + HEAD_H
        + TITLE_H
        + _text_rows(text_len) * CELL_H
        + TITLE_H
        + grid * g
        + TITLE_H
        + STRIP_H
        + MARGIN
    )
    return width, height


def code_shade(index: int, num_codes: int) -> tuple[int, int, int]:
    """Image-code colour, lighter for earlier raster positions (the sampling order)."""
    f = 0.75 * (1 - index / max(1, num_codes - 1))
    return tuple(round(c + (255 - c) * f) for c in IMAGE_COLOR)


def slot_kinds(text_ids: torch.Tensor, tokenizer: TextTokenizer) -> list[str]:
    """'bos', then 'token' or 'pad' for every text slot of one encoded caption."""
    return ["bos"] + ["pad" if bool(tokenizer.is_pad(i)) else "token" for i in text_ids]


def stream_layout(tokenizer: TextTokenizer, shape: StreamShape, prompt: str) -> Image.Image:
    """The ``[<bos>, t_1 … t_L | c_1 … c_N]`` stream of one caption (paper section 2.2).

    Text slots are blue for BPE tokens and amber for pads (each slot has its own
    pad id, ``pad_i``); the image codes are drawn on their grid, shaded by raster
    index; the bottom strip shows the same stream as the 1-D sequence the
    transformer reads.
    """
    ids = tokenizer.encode(prompt)[0]
    kinds = slot_kinds(ids, tokenizer)
    L, grid, N = shape.text_len, shape.grid, shape.num_codes
    img = Image.new("RGB", layout_size(L, grid), BACKGROUND)
    draw = ImageDraw.Draw(img)
    big, fnt, small = font(18), font(13), font(10)
    heading = (
        f"the token stream: one caption's text tokens, then {N} image codes (paper section 2.2)"
    )
    draw.text((MARGIN, MARGIN - 4), heading, fill=INK, font=big)
    draw.text((MARGIN, MARGIN + TITLE_H), f'caption: "{prompt}"', fill=INK, font=fnt)
    x = MARGIN
    for color, label in LEGEND:
        y = MARGIN + 2 * TITLE_H
        draw.rectangle((x, y, x + 11, y + 11), fill=color)
        draw.text((x + 16, y - 1), label, fill=INK, font=small)
        x += 16 + int(draw.textlength(label, font=small)) + 20
    n_tokens = sum(k == "token" for k in kinds)
    draw.text(
        (MARGIN, MARGIN + HEAD_H),
        f"text slots: <bos> + {L} positions ({n_tokens} BPE tokens, {L - n_tokens} per-position "
        "pads); under each: its id",
        fill=INK,
        font=fnt,
    )
    for slot, kind in enumerate(kinds):
        color = {"bos": BOS_COLOR, "token": TOKEN_COLOR, "pad": PAD_COLOR}[kind]
        box = text_cell_box(slot)
        draw.rectangle(box, fill=color)
        if kind == "bos":
            label = "<bos>"
        elif kind == "pad":
            label = f"pad{int(ids[slot - 1]) - tokenizer.bpe_vocab_size}"
        else:
            label = tokenizer.tokenizer.id_to_token(int(ids[slot - 1])) or "?"
            label = label.replace("Ġ", "_")[:7]
        draw.text((box[0] + 4, box[1] + 4), label, fill=BACKGROUND, font=fnt)
        if slot:
            draw.text((box[0] + 4, box[1] + 20), f"id {int(ids[slot - 1])}", fill=INK, font=small)
    grid_top = grid_cell_box(0, L, grid)[1]
    draw.text(
        (MARGIN, grid_top - TITLE_H + 6),
        f"image: {grid}x{grid} = {N} codes from a codebook of {shape.image_vocab}, raster order"
        " (numbers: position in the stream's image part)",
        fill=INK,
        font=fnt,
    )
    g = grid_cell_px(grid)
    for j in range(N):
        box = grid_cell_box(j, L, grid)
        draw.rectangle(box, fill=code_shade(j, N))
        if g >= 20:
            draw.text((box[0] + 2, box[1] + 2), str(j + 1), fill=INK, font=small)
    strip_top = grid_top + grid * g + TITLE_H
    draw.text(
        (MARGIN, strip_top - TITLE_H + 6),
        f"the stream the transformer reads: {L + 1 + N} tokens, left to right",
        fill=INK,
        font=fnt,
    )
    width = img.width - 2 * MARGIN
    total = L + 1 + N
    for p in range(total):
        x0 = MARGIN + p * width // total
        x1 = MARGIN + (p + 1) * width // total - 1
        color = (
            {"bos": BOS_COLOR, "token": TOKEN_COLOR, "pad": PAD_COLOR}[kinds[p]]
            if p <= L
            else code_shade(p - L - 1, N)
        )
        draw.rectangle((x0, strip_top, max(x0, x1), strip_top + STRIP_H - 1), fill=color)
    img.info["title"] = heading
    return img
