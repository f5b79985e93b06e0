"""Pictures of DALL-E 1's attention masks (paper section 2.2 and appendix B.1).

Every mask drawn here comes from :mod:`dalle1.masks` (``stream_mask``, ``image_mask``,
``layer_kinds``); nothing re-derives a pattern. Each picture shows a mask at two
shapes side by side:

* the paper's stream: 256 text slots and a 32×32 grid of codes, 11×11 conv kernel —
  ``<bos>`` + 256 + 1023 = 1280 input positions, one picture pixel per
  ``[query, key]`` pair;
* the model's own stream (its text length, grid and conv kernel), upscaled.

Pictures:

* :func:`kind_picture` — one kind of mask (``dense``, ``row``, ``column``, ``conv``);
* :func:`layer_picture` — layer *i* of the model: the kind the paper's ``dalle``
  schedule gives that layer, at the paper's shape and the model's, and — for a model
  trained with ``attention: dense`` — next to what the model really uses;
* :func:`figure11_picture` — the paper's Figure 11 setting (6 text tokens, a 4×4
  grid, 3×3 kernel), including (c): the column mask with the image states
  transposed;
* :func:`fields_picture` and :func:`schedule_picture` — what one code may see on
  the grid under each kind, and under each layer of the schedule (legible at any
  grid, where a full mask is a thin band).

Every panel records where it landed (:class:`Panel`), so a test can read each
cell of the saved picture back and compare it with ``masks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ...masks import KINDS, image_mask, layer_kinds, stream_mask
from ...transformer import StreamShape
from .figures import (
    FUTURE,
    HIDDEN,
    IMAGE_COLOR,
    MASK_OFF,
    QUERY_COLOR,
    TOKEN_COLOR,
    finish,
    frame_axes,
    legend_row,
    mosaic,
    new_figure,
    place,
    read_cells,
    text,
    title,
    title_height,
    upscale,
)


@dataclass(frozen=True)
class Stream:
    """The shape a mask is drawn at: text slots, grid side, conv kernel side."""

    text_len: int
    grid: int
    conv_kernel: int
    name: str

    @property
    def size(self) -> int:
        """Input positions ``[<bos>, t_1 … t_L, c_1 … c_{N-1}]`` (masks.stream_mask's side)."""
        return self.text_len + self.grid * self.grid

    def describe(self) -> str:
        return (
            f"{self.text_len} text slots, {self.grid}×{self.grid} grid, "
            f"{self.conv_kernel}×{self.conv_kernel} conv ({self.size} positions)"
        )


PAPER = Stream(256, 32, 11, "the paper")  # section 2.2 and appendix B.1
FIGURE11 = Stream(6, 4, 3, "paper Figure 11")


def model_stream(shape: StreamShape, conv_kernel: int) -> Stream:
    return Stream(shape.text_len, shape.grid, conv_kernel, "this model")


@dataclass
class Panel:
    """One drawn mask: which matrix it is and where its cells are in the picture."""

    kind: str
    stream: Stream
    box: tuple[int, int, int, int]  # pixel box of the cells (x0, y0, x1, y1), y downwards
    field_query: int | None = None  # None: the whole stream mask; else one code's field
    transposed: bool = False  # the image part re-indexed column-major (Figure 11c)

    def expected(self) -> torch.Tensor:
        """The matrix (or the field, as a grid) this panel shows, straight from masks.py."""
        s = self.stream
        if self.field_query is not None:
            return image_mask(self.kind, s.grid, s.conv_kernel)[self.field_query].view(
                s.grid, s.grid
            )
        mask = stream_mask(self.kind, s.text_len, s.grid, s.conv_kernel)
        return transpose_image_part(mask, s) if self.transposed else mask

    def read(self, img: Image.Image) -> np.ndarray:
        """The colours of this panel's cells in ``img``: (rows, cols, 3)."""
        n = self.stream.grid if self.field_query is not None else self.stream.size
        return read_cells(img, self.box, n, n)


@dataclass
class MaskPicture:
    image: Image.Image
    panels: list[Panel]


# --- the matrices as rasters -----------------------------------------------------------------


def mask_scale(size: int, target: int = 360) -> int:
    """Integer upscale of a mask of ``size`` positions: about ``target`` px, at least 1."""
    return max(1, -(-target // size)) if size < target else 1


def mask_raster(mask: torch.Tensor, text_positions: int, scale: int = 1) -> np.ndarray:
    """One ``scale``² block per ``[query, key]`` (rows = queries): (n·s, n·s, 3) uint8.

    Allowed pairs are blue when the key is a text position (``<bos>`` and the text
    slots: the first ``text_positions`` keys) and green when it is an image code;
    masked pairs are light grey.
    """
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square matrix, got shape {tuple(mask.shape)}")
    m = mask.bool().cpu().numpy()
    rgb = np.empty((*m.shape, 3), dtype=np.uint8)
    rgb[:] = MASK_OFF
    is_text = np.arange(m.shape[1]) < text_positions
    rgb[m & is_text[None, :]] = TOKEN_COLOR
    rgb[m & ~is_text[None, :]] = IMAGE_COLOR
    return upscale(rgb, scale)


def colours_to_mask(colours: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`mask_raster` on cell colours: True where a cell is not ``MASK_OFF``."""
    return torch.from_numpy((colours != np.array(MASK_OFF, dtype=np.uint8)).any(-1))


def transpose_image_part(mask: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Re-index the image positions of a stream mask column-major (grid rows ↔ columns).

    Paper, Figure 11: "we transpose the row and column dimensions of the image states
    when applying column attention, so that we can use mask (c) instead of mask (b)".
    The last code is never an input, and transposing keeps it in place, so the
    other codes only trade places among themselves.
    """
    g, n_text = stream.grid, stream.text_len + 1
    j = torch.arange(g * g - 1)
    order = (j % g) * g + j // g  # transposed position -> raster position
    index = torch.cat([torch.arange(n_text), n_text + order])
    return mask[index][:, index]


# --- stream masks, side by side --------------------------------------------------------------

LEGEND = [
    (TOKEN_COLOR, "query may attend this text key (<bos> or a text slot)"),
    (IMAGE_COLOR, "query may attend this image key"),
    (MASK_OFF, "masked"),
]


def visible_image_keys(kind: str, stream: Stream) -> float:
    """Mean number of image codes an image code attends (itself included)."""
    return image_mask(kind, stream.grid, stream.conv_kernel).sum(-1).float().mean().item()


def same_as_dense(kind: str, stream: Stream) -> bool:
    g, k = stream.grid, stream.conv_kernel
    return torch.equal(image_mask(kind, g, k), image_mask("dense", g, k))


def kind_note(kind: str, stream: Stream) -> str:
    """One line under a panel: how much of the image each code sees, and when that is all."""
    seen = visible_image_keys(kind, stream)
    dense = visible_image_keys("dense", stream)
    line = f"an image code attends {seen:.1f} codes on average (dense: {dense:.1f})"
    if kind != "dense" and same_as_dense(kind, stream):
        what = f"a {stream.conv_kernel}×{stream.conv_kernel} window" if kind == "conv" else kind
        line += f"\n= dense: on a {stream.grid}×{stream.grid} grid {what} covers every earlier code"
    return line


def stream_panels(
    heading: str, lines: list[str], specs: list[tuple[str, Stream, str, bool]]
) -> MaskPicture:
    """Stream masks side by side; ``specs`` = (kind, stream, panel heading, transposed)."""
    scales = [mask_scale(s.size) for _, s, _, _ in specs]
    sides = [s.size * k for (_, s, _, _), k in zip(specs, scales)]
    left, gap = 96, 110
    width = max(left + sum(sides) + gap * (len(sides) - 1) + 40, 900)
    top = title_height(lines) + 3 * 16 + 8  # then two lines of panel heading
    height = top + max(sides) + 130
    fig = new_figure(width, height)
    title(fig, heading, lines)
    panels, x = [], left
    for (kind, stream, panel_heading, transposed), scale, side in zip(specs, scales, sides):
        mask = stream_mask(kind, stream.text_len, stream.grid, stream.conv_kernel)
        if transposed:
            mask = transpose_image_part(mask, stream)
        box = place(fig, mask_raster(mask, stream.text_len + 1, scale), x, top)
        panels.append(Panel(kind, stream, box, transposed=transposed))
        text(fig, x, top - 3 * 16 - 4, panel_heading, fontsize=10, weight="bold")
        text(fig, x, top - 2 * 16 - 4, stream.describe(), fontsize=9)
        ax = frame_axes(fig, box, stream.size, stream.size)
        n_text = stream.text_len + 1
        last = stream.size - 1
        ticks = [0, n_text, last]
        image_name = "c'" if transposed else "c"
        labels = ["<bos>", f"{image_name}1", f"{image_name}{stream.grid**2 - 1}"]
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.set_xlabel("key position (attended to)", fontsize=9)
        ax.set_ylabel("query position (attending)", fontsize=9)
        text(fig, x, top + side + 44, kind_note(kind, stream), fontsize=9)
        x += side + gap
    legend_row(fig, left, height - 28, LEGEND)
    return MaskPicture(finish(fig, heading), panels)


ROWS_ARE = (
    "rows: queries, columns: keys, one cell per [query, key] pair of dalle1.masks.stream_mask"
)


def kind_picture(kind: str, model: Stream) -> MaskPicture:
    """One kind of mask at the paper's shape and at the model's, side by side."""
    return stream_panels(
        f"the {kind} attention mask (paper appendix B.1)",
        [ROWS_ARE, "text attends earlier text causally; every image code attends all the text"],
        [
            (kind, PAPER, "at the paper's shape", False),
            (kind, model, "at this model's shape", False),
        ],
    )


def layer_picture(layer: int, depth: int, attention: str, model: Stream) -> MaskPicture:
    """Layer ``layer`` (0-based) of a ``depth``-layer model trained with ``attention``."""
    paper_kind = layer_kinds(depth, "dalle")[layer]
    used = layer_kinds(depth, attention)[layer]
    n = layer + 1
    specs = [(paper_kind, PAPER, f"paper's schedule: layer {n} = {paper_kind}", False)]
    if attention == "dalle":
        specs.append((used, model, f"this model, layer {n}: {used} (what it uses)", False))
        sub = f"this model was trained with `attention: dalle`: layer {n} of {depth} uses {used}"
    else:
        specs.append(
            (paper_kind, model, f"`attention: dalle` would use {paper_kind} (not used here)", False)
        )
        specs.append((used, model, f"this model, layer {n}: {used} (what it uses)", False))
        sub = (
            f"this model was trained with `attention: {attention}`: every layer is {used}; "
            f"the middle panel is what the paper's `dalle` schedule would give layer {n}"
        )
    return stream_panels(f"layer {n} of {depth}: attention mask", [sub, ROWS_ARE], specs)


def figure11_picture() -> MaskPicture:
    """The masks of the paper's Figure 11 at its own size (6 text tokens, 4×4 grid, 3×3)."""
    return stream_panels(
        "the paper's Figure 11, drawn from dalle1.masks (6 text tokens, 4×4 grid, 3×3 conv)",
        [
            "(a) row  (b) column  (c) column with the image states transposed  (d) conv;",
            '(a) "each image token attends to the previous 5 image tokens in raster order"'
            " (grid + 1, itself included); (c) is (b) re-indexed column-major",
        ],
        [
            ("row", FIGURE11, "(a) row", False),
            ("column", FIGURE11, "(b) column", False),
            ("column", FIGURE11, "(c) column, transposed", True),
            ("conv", FIGURE11, "(d) conv 3×3", False),
        ],
    )


# --- what one code sees on the grid ----------------------------------------------------------

FIELD_LEGEND = [
    (QUERY_COLOR, "the query code"),
    (IMAGE_COLOR, "earlier code it may attend"),
    (HIDDEN, "earlier code the mask hides"),
    (FUTURE, "later code (causal: never seen)"),
]


def field_cell(grid: int, target: int = 192) -> int:
    return max(3, target // grid)


def field_raster(kind: str, stream: Stream, query: int, cell: int) -> np.ndarray:
    """The grid as cells (cell px each; a white line between cells when cell >= 6)."""
    g = stream.grid
    seen = image_mask(kind, g, stream.conv_kernel)[query].view(g, g).numpy()
    later = (np.arange(g * g) > query).reshape(g, g)
    rgb = np.empty((g, g, 3), dtype=np.uint8)
    rgb[:] = HIDDEN
    rgb[seen] = IMAGE_COLOR
    rgb[later] = FUTURE
    rgb[query // g, query % g] = QUERY_COLOR
    out = upscale(rgb, cell)
    if cell >= 6:
        out[cell - 1 :: cell, :] = 255
        out[:, cell - 1 :: cell] = 255
    return out


def field_colour_to_seen(colours: np.ndarray) -> torch.Tensor:
    """Cell colours of a field -> may-attend per cell (the query counts: it sees itself)."""
    seen = (colours == np.array(IMAGE_COLOR)).all(-1) | (colours == np.array(QUERY_COLOR)).all(-1)
    return torch.from_numpy(seen)


def middle_query(grid: int) -> int:
    return (grid // 2) * grid + grid // 2


def fields_mosaic(
    heading: str,
    lines: list[str],
    rows: list[tuple[str, list[tuple[str, Stream]]]],
    captions: list[list[str]] | None = None,
    col_labels: list[str] | None = None,
) -> MaskPicture:
    """Fields of the middle code, one row per (label, [(kind, stream), ...]).

    ``captions`` default to :func:`field_caption` (how many codes the query sees).
    """
    arrays, meta = [], []
    for _, row in rows:
        arrays.append(
            [field_raster(k, s, middle_query(s.grid), field_cell(s.grid)) for k, s in row]
        )
        meta.append([(k, s, middle_query(s.grid)) for k, s in row])
    if captions is None:
        captions = [[field_caption(k, s, q) for k, s, q in row] for row in meta]
    picture = mosaic(
        arrays,
        heading,
        lines,
        row_labels=[label for label, _ in rows],
        captions=captions,
        col_labels=col_labels,
        legend=FIELD_LEGEND,
    )
    panels = [
        Panel(kind, stream, box, field_query=q)
        for meta_row, box_row in zip(meta, picture.boxes)
        for (kind, stream, q), box in zip(meta_row, box_row)
    ]
    return MaskPicture(picture.image, panels)


def field_caption(kind: str, stream: Stream, query: int) -> str:
    seen = int(image_mask(kind, stream.grid, stream.conv_kernel)[query].sum())
    note = " (= dense)" if kind != "dense" and same_as_dense(kind, stream) else ""
    return f"{kind}: {seen} of {query + 1} codes{note}"


def fields_picture(model: Stream) -> MaskPicture:
    """For each kind, what the middle code may attend, at the paper's grid and the model's."""
    return fields_mosaic(
        "what one image code may attend, by mask kind (dalle1.masks.image_mask)",
        [
            "the red code in the middle of the grid; counts include the code itself",
            "every image code also attends every text position (not drawn)",
        ],
        [
            (
                f"the paper, {PAPER.grid}×{PAPER.grid}, conv {PAPER.conv_kernel}",
                [(k, PAPER) for k in KINDS],
            ),
            (
                f"this model, {model.grid}×{model.grid}, conv {model.conv_kernel}",
                [(k, model) for k in KINDS],
            ),
        ],
    )


SCHEDULE_SHOWN = 12  # deeper models show layers 1-8 and the last 4


def shown_layers(depth: int) -> list[int]:
    if depth <= SCHEDULE_SHOWN:
        return list(range(depth))
    return [*range(8), *range(depth - 4, depth)]


def schedule_picture(depth: int, attention: str, model: Stream) -> MaskPicture:
    """Each layer's mask as the middle code's field: the paper's schedule and the model's."""
    layers = shown_layers(depth)
    paper = layer_kinds(depth, "dalle")
    used = layer_kinds(depth, attention)
    rows = [
        ("the paper's schedule, 32×32", [(paper[i], PAPER) for i in layers]),
        (
            "`dalle` at this model's grid" + ("" if attention == "dalle" else " (not used)"),
            [(paper[i], model) for i in layers],
        ),
    ]
    if attention != "dalle":
        rows.append((f"this model uses ({attention})", [(used[i], model) for i in layers]))
    lines = [
        "layer i (1-based) uses column when (i - 2) mod 4 = 0, row otherwise, conv in the last "
        "layer (dalle1.masks.layer_kinds)",
        f"this model: {depth} layers, `attention: {attention}`"
        + ("" if len(layers) == depth else f"; layers 9-{depth - 4} repeat the period of 4"),
    ]

    return fields_mosaic(
        "the attention schedule, layer by layer (the middle code's field in each layer)",
        lines,
        rows,
        captions=[[f"{i + 1}: {kind}" for i, (kind, _) in zip(layers, row)] for _, row in rows],
        col_labels=[f"layer {i + 1}" for i in layers],
    )
