"""DALL-E's attention masks (paper appendix B.1, Figure 11) against hand-drawn pictures."""

import pytest
import torch

from dalle1.config import DALLEConfig
from dalle1.masks import (
    KINDS,
    allowed,
    image_mask,
    image_offsets,
    key_table,
    layer_kinds,
    mask_to_bias,
    stream_mask,
    stream_rows,
    transpose_order,
    transposed_column_mask,
)
from dalle1.transformer import DALLE, StreamShape


def picture(text: str) -> torch.Tensor:
    """'x' = may attend, '.' = may not; one line per query, spaces ignored."""
    rows = [line.replace(" ", "") for line in text.strip().splitlines()]
    return torch.tensor([[c == "x" for c in row] for row in rows])


# Figure 11 of the paper: 6 text tokens, then a 4×4 grid of image tokens (row r holds
# codes 4r … 4r+3). Rows are queries, columns keys: the 6 text keys, then the image keys
# grouped by grid row. Text attends causally to text; every image token attends all the
# text. Drawn by hand from the caption's sentences (see dalle1/masks.py).

# (a) row: "each image token attends to the previous 5 image tokens in raster order ...
# so that the last token being attended to is the one in the same column of the previous
# row": codes p-4 … p, across row ends.
FIGURE_ROW = picture("""
    x..... .... .... .... ....
    xx.... .... .... .... ....
    xxx... .... .... .... ....
    xxxx.. .... .... .... ....
    xxxxx. .... .... .... ....
    xxxxxx .... .... .... ....
    xxxxxx x... .... .... ....
    xxxxxx xx.. .... .... ....
    xxxxxx xxx. .... .... ....
    xxxxxx xxxx .... .... ....
    xxxxxx xxxx x... .... ....
    xxxxxx .xxx xx.. .... ....
    xxxxxx ..xx xxx. .... ....
    xxxxxx ...x xxxx .... ....
    xxxxxx .... xxxx x... ....
    xxxxxx .... .xxx xx.. ....
    xxxxxx .... ..xx xxx. ....
    xxxxxx .... ...x xxxx ....
    xxxxxx .... .... xxxx x...
    xxxxxx .... .... .xxx xx..
    xxxxxx .... .... ..xx xxx.
    xxxxxx .... .... ...x xxxx
""")

# (b) column: the same column, every earlier row.
FIGURE_COLUMN = picture("""
    x..... .... .... .... ....
    xx.... .... .... .... ....
    xxx... .... .... .... ....
    xxxx.. .... .... .... ....
    xxxxx. .... .... .... ....
    xxxxxx .... .... .... ....
    xxxxxx x... .... .... ....
    xxxxxx .x.. .... .... ....
    xxxxxx ..x. .... .... ....
    xxxxxx ...x .... .... ....
    xxxxxx x... x... .... ....
    xxxxxx .x.. .x.. .... ....
    xxxxxx ..x. ..x. .... ....
    xxxxxx ...x ...x .... ....
    xxxxxx x... x... x... ....
    xxxxxx .x.. .x.. .x.. ....
    xxxxxx ..x. ..x. ..x. ....
    xxxxxx ...x ...x ...x ....
    xxxxxx x... x... x... x...
    xxxxxx .x.. .x.. .x.. .x..
    xxxxxx ..x. ..x. ..x. ..x.
    xxxxxx ...x ...x ...x ...x
""")

# (c) column with "the row and column dimensions of the image states" transposed: image
# keys and queries now grouped by grid *column*; causal inside each column.
FIGURE_COLUMN_TRANSPOSED = picture("""
    x..... .... .... .... ....
    xx.... .... .... .... ....
    xxx... .... .... .... ....
    xxxx.. .... .... .... ....
    xxxxx. .... .... .... ....
    xxxxxx .... .... .... ....
    xxxxxx x... .... .... ....
    xxxxxx xx.. .... .... ....
    xxxxxx xxx. .... .... ....
    xxxxxx xxxx .... .... ....
    xxxxxx .... x... .... ....
    xxxxxx .... xx.. .... ....
    xxxxxx .... xxx. .... ....
    xxxxxx .... xxxx .... ....
    xxxxxx .... .... x... ....
    xxxxxx .... .... xx.. ....
    xxxxxx .... .... xxx. ....
    xxxxxx .... .... xxxx ....
    xxxxxx .... .... .... x...
    xxxxxx .... .... .... xx..
    xxxxxx .... .... .... xxx.
    xxxxxx .... .... .... xxxx
""")

# (d) conv, 3×3 kernel "with wraparound behavior (similar to the row attention)": the
# left neighbour and the three codes above, as raster offsets 1 and 3, 4, 5, so that at
# a row end the kernel continues on the neighbouring row.
FIGURE_CONV3 = picture("""
    x..... .... .... .... ....
    xx.... .... .... .... ....
    xxx... .... .... .... ....
    xxxx.. .... .... .... ....
    xxxxx. .... .... .... ....
    xxxxxx .... .... .... ....
    xxxxxx x... .... .... ....
    xxxxxx xx.. .... .... ....
    xxxxxx .xx. .... .... ....
    xxxxxx x.xx .... .... ....
    xxxxxx xx.x x... .... ....
    xxxxxx xxx. xx.. .... ....
    xxxxxx .xxx .xx. .... ....
    xxxxxx ..xx x.xx .... ....
    xxxxxx ...x xx.x x... ....
    xxxxxx .... xxx. xx.. ....
    xxxxxx .... .xxx .xx. ....
    xxxxxx .... ..xx x.xx ....
    xxxxxx .... ...x xx.x x...
    xxxxxx .... .... xxx. xx..
    xxxxxx .... .... .xxx .xx.
    xxxxxx .... .... ..xx x.xx
""")

FIGURE = {"row": FIGURE_ROW, "column": FIGURE_COLUMN, "conv": FIGURE_CONV3}
POSITIONS = torch.arange(22)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_masks_match_figure_11(kind):
    assert torch.equal(allowed(kind, 6, 4, POSITIONS, POSITIONS, conv_kernel=3), FIGURE[kind])
    # the image block alone, and the input stream: [<bos>, 5 text slots, codes 0 … 14]
    assert torch.equal(image_mask(kind, 4, conv_kernel=3), FIGURE[kind][6:, 6:])
    assert torch.equal(stream_mask(kind, 5, 4, conv_kernel=3), FIGURE[kind][:21, :21])


def test_transposed_column_mask_is_figure_11c():
    assert torch.equal(transposed_column_mask(4), FIGURE_COLUMN_TRANSPOSED[6:, 6:])
    # (b) and (c) are one attention pattern: (c) is (b) with the codes re-ordered
    order = torch.cat([torch.arange(6), 6 + transpose_order(4)])
    assert torch.equal(FIGURE_COLUMN[order][:, order], FIGURE_COLUMN_TRANSPOSED)
    assert transpose_order(4)[:6].tolist() == [0, 4, 8, 12, 1, 5]


def test_row_window_crosses_row_ends():
    # the first code of a row sees the code above it and the rest of the row above
    m = image_mask("row", 5)
    assert m[10].nonzero().flatten().tolist() == [5, 6, 7, 8, 9, 10]
    assert image_offsets("row", 5).tolist() == [0, 1, 2, 3, 4, 5]


def test_conv_offsets_wrap_in_raster_order():
    # 5×5 kernel (r = 2) on an 8-wide grid: up to 2 codes left in its own row, and
    # columns c-2 … c+2 in each of the 2 rows above, counted along the raster order
    assert image_offsets("conv", 8, 5).tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18]
    m = image_mask("conv", 8, 5)
    # code 8 (row 1, column 0): "left" wraps to codes 7, 6 at the end of row 0
    assert m[8].nonzero().flatten().tolist() == [0, 1, 2, 6, 7, 8]


def test_conv_window_wider_than_the_grid_is_dense_causal():
    assert torch.equal(image_mask("conv", 4, conv_kernel=11), image_mask("dense", 4))
    assert torch.equal(image_mask("dense", 4), torch.ones(16, 16, dtype=torch.bool).tril())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", [1, 3, 5])
def test_every_mask_is_causal_and_sees_itself(kind, grid):
    m = image_mask(kind, grid, conv_kernel=3)
    assert not m.triu(1).any()
    assert m.diagonal().all()


@pytest.mark.parametrize("kind", KINDS)
def test_stream_mask_is_causal_and_text_is_seen_by_everyone(kind):
    L, g = 3, 3
    m = stream_mask(kind, L, g, 3)
    assert m.shape == (L + g * g, L + g * g)
    assert not m.triu(1).any()
    assert m[:, : L + 1].equal(torch.ones(L + g * g, L + 1, dtype=torch.bool).tril())


@pytest.mark.parametrize("kind", KINDS)
def test_stream_rows_and_key_table_agree_with_the_whole_mask(kind):
    L, g, kernel = 4, 5, 3
    full = stream_mask(kind, L, g, kernel)
    assert torch.equal(stream_rows(kind, L, g, 7, 19, kernel), full[7:19, :19])
    index, count = key_table(kind, L, g, kernel)
    for p in range(len(full)):
        keys = index[p, : count[p]]
        assert keys.tolist() == full[p].nonzero().flatten().tolist()


def test_paper_layer_schedule():
    # paper: column where (i - 2) mod 4 == 0 (1-based i), row elsewhere, conv on the last layer
    kinds = layer_kinds(8, "dalle")
    assert kinds == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_kinds(1, "dalle") == ["conv"]
    assert layer_kinds(3, "dense") == ["dense"] * 3


def test_bias_is_zero_where_allowed_and_minus_inf_elsewhere():
    m = image_mask("row", 3)
    bias = mask_to_bias(m)
    assert bias.dtype == torch.float32
    assert torch.equal(bias == 0, m) and torch.isneginf(bias[~m]).all()


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown mask kind"):
        image_mask("diagonal", 4)
    with pytest.raises(ValueError, match="odd"):
        image_mask("conv", 4, conv_kernel=4)
    with pytest.raises(ValueError, match="attention must be"):
        layer_kinds(4, "sparse")


# --- the masks inside the model: perturbation tests on the logits ------------------------

L, GRID = 3, 4  # text_len, grid: input stream [<bos>, t1..t3, c0..c14]
SHAPE = StreamShape(text_vocab=30, text_len=L, image_vocab=16, grid=GRID, bos_id=1)


def tiny(kinds) -> DALLE:
    torch.manual_seed(0)
    cfg = DALLEConfig(dim=32, depth=len(kinds), heads=2, dim_head=16, conv_kernel=3)
    return DALLE(cfg, SHAPE, kinds=kinds).eval()


def influence(model: DALLE) -> torch.Tensor:
    """(N-1, N-1) bool: does changing input code k change the logits read at input code q?

    Row k+1 of the batch changes code k alone; the logits at the position holding code q
    are ``image_logits[:, q + 1]``.
    """
    n = GRID * GRID
    g = torch.Generator().manual_seed(3)
    text = torch.randint(2, 30, (1, L), generator=g).expand(n, L)
    codes = torch.randint(0, 16, (1, n), generator=g).repeat(n, 1)
    for k in range(n - 1):
        codes[k + 1, k] = (codes[k + 1, k] + 7) % 16
    with torch.no_grad():
        _, logits = model(text, codes)
    diff = (logits[1:, 1:] - logits[:1, 1:]).abs().amax(-1)  # [k, q]
    return (diff > 1e-5).T


def reach(kinds: list[str], text_len: int, grid: int) -> torch.Tensor:
    """Which stream positions can influence which after these layers (boolean product)."""
    out = torch.eye(text_len + grid * grid, dtype=torch.bool)
    for kind in kinds:
        out = (stream_mask(kind, text_len, grid, conv_kernel=3).float() @ out.float()) > 0
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_reads_exactly_the_codes_its_mask_allows(kind):
    expected = image_mask(kind, GRID, conv_kernel=3)[:-1, :-1]
    assert torch.equal(influence(tiny([kind])), expected)


def test_paper_schedule_reads_exactly_the_composed_masks():
    # With several layers a code reaches a query through intermediate positions: the
    # allowed set is the boolean product of the layers' stream masks (each includes the
    # diagonal, i.e. the residual path). Compare the 2-layer paper schedule with it.
    kinds = layer_kinds(2, "dalle")  # row, conv
    expected = reach(kinds, L, GRID)[L + 1 :, L + 1 :]  # image queries x image keys
    got = influence(tiny(kinds))
    assert torch.equal(got, expected)
    assert not expected.all() and expected.any()  # the test is not vacuous
    assert not torch.equal(got, image_mask("dense", GRID)[:-1, :-1])  # sparser than dense


@pytest.mark.parametrize("grid", [4, 7])
def test_a_row_then_a_column_layer_reach_every_earlier_code(grid):
    # why the paper's window is grid + 1 long: the column layer then gathers, from every
    # earlier row, a window that ends right above the previous one's start
    got = reach(["row", "column"], L, grid)
    assert torch.equal(got, torch.ones_like(got).tril())
    assert not torch.equal(reach(["row", "row"], L, grid), got)


@pytest.mark.parametrize("kinds", [["row"], ["column"], ["conv"], ["row", "column", "conv"]])
def test_cached_decoding_keeps_the_masks(kinds):
    m = tiny(kinds)
    g = torch.Generator().manual_seed(4)
    text, codes = (
        torch.randint(2, 30, (2, L), generator=g),
        torch.randint(0, 16, (2, 16), generator=g),
    )
    with torch.no_grad():
        _, full = m(text, codes)
        logits, cache = m.prefill(text)
        steps = [logits]
        for i in range(15):
            logits, cache = m.step(codes[:, i], i, cache)
            steps.append(logits)
    assert (torch.stack(steps, 1) - full).abs().max() <= 1e-4
