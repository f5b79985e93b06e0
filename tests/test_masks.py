"""DALL-E's attention masks (paper appendix B.1) against hand-drawn 4×4-grid pictures."""

import pytest
import torch

from dalle1.config import DALLEConfig
from dalle1.masks import KINDS, image_mask, layer_kinds, mask_to_bias, stream_mask
from dalle1.transformer import DALLE, StreamShape


def picture(text: str) -> torch.Tensor:
    """'x' = may attend, '.' = may not; one line per query, spaces ignored."""
    rows = [line.replace(" ", "") for line in text.strip().splitlines()]
    return torch.tensor([[c == "x" for c in row] for row in rows])


# 4×4 grid, codes in raster order: row r holds codes 4r … 4r+3. Key columns are grouped
# by grid row. Each line is one query code.
ROW_4x4 = picture("""
    x... .... .... ....
    xx.. .... .... ....
    xxx. .... .... ....
    xxxx .... .... ....
    .... x... .... ....
    .... xx.. .... ....
    .... xxx. .... ....
    .... xxxx .... ....
    .... .... x... ....
    .... .... xx.. ....
    .... .... xxx. ....
    .... .... xxxx ....
    .... .... .... x...
    .... .... .... xx..
    .... .... .... xxx.
    .... .... .... xxxx
""")

COLUMN_4x4 = picture("""
    x... .... .... ....
    .x.. .... .... ....
    ..x. .... .... ....
    ...x .... .... ....
    x... x... .... ....
    .x.. .x.. .... ....
    ..x. ..x. .... ....
    ...x ...x .... ....
    x... x... x... ....
    .x.. .x.. .x.. ....
    ..x. ..x. ..x. ....
    ...x ...x ...x ....
    x... x... x... x...
    .x.. .x.. .x.. .x..
    ..x. ..x. ..x. ..x.
    ...x ...x ...x ...x
""")

# 3×3 convolutional window (radius 1), causal: the row above (3 cells) and the left neighbour.
CONV3_4x4 = picture("""
    x... .... .... ....
    xx.. .... .... ....
    .xx. .... .... ....
    ..xx .... .... ....
    xx.. x... .... ....
    xxx. xx.. .... ....
    .xxx .xx. .... ....
    ..xx ..xx .... ....
    .... xx.. x... ....
    .... xxx. xx.. ....
    .... .xxx .xx. ....
    .... ..xx ..xx ....
    .... .... xx.. x...
    .... .... xxx. xx..
    .... .... .xxx .xx.
    .... .... ..xx ..xx
""")


def test_row_mask_matches_the_drawing():
    assert torch.equal(image_mask("row", 4), ROW_4x4)


def test_column_mask_matches_the_drawing():
    assert torch.equal(image_mask("column", 4), COLUMN_4x4)


def test_conv_mask_matches_the_drawing():
    assert torch.equal(image_mask("conv", 4, conv_kernel=3), CONV3_4x4)


def test_conv_window_wider_than_the_grid_is_dense_causal():
    assert torch.equal(image_mask("conv", 4, conv_kernel=11), image_mask("dense", 4))
    assert torch.equal(image_mask("dense", 4), torch.ones(16, 16, dtype=torch.bool).tril())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", [1, 3, 5])
def test_every_mask_is_causal_and_sees_itself(kind, grid):
    m = image_mask(kind, grid, conv_kernel=3)
    assert not m.triu(1).any()
    assert m.diagonal().all()


def test_stream_mask_on_a_tiny_stream():
    # text_len 2, grid 2: the input stream is [<bos>, t1, t2, c0, c1, c2] (c3 is never an input)
    expected = picture("""
        x.. ...
        xx. ...
        xxx ...
        xxx x..
        xxx xx.
        xxx ..x
    """)
    assert torch.equal(stream_mask("row", 2, 2), expected)
    column = expected.clone()
    column[4, 3], column[5, 3] = False, True  # c1 (col 1) sees only itself; c2 (col 0) sees c0
    assert torch.equal(stream_mask("column", 2, 2), column)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_mask_is_causal_and_text_is_seen_by_everyone(kind):
    L, g = 3, 3
    m = stream_mask(kind, L, g, 3)
    assert m.shape == (L + g * g, L + g * g)
    assert not m.triu(1).any()
    assert m[:, : L + 1].equal(torch.ones(L + g * g, L + 1, dtype=torch.bool).tril())


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


@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_reads_exactly_the_codes_its_mask_allows(kind):
    expected = image_mask(kind, GRID, conv_kernel=3)[:-1, :-1]
    assert torch.equal(influence(tiny([kind])), expected)


def test_paper_schedule_reads_exactly_the_composed_masks():
    # With several layers a code reaches a query through intermediate positions: the
    # allowed set is the boolean product of the layers' stream masks (each includes the
    # diagonal, i.e. the residual path). Compare the 5-layer paper schedule with it.
    kinds = layer_kinds(5, "dalle")  # row, column, row, row, conv
    reach = torch.eye(L + GRID * GRID, dtype=torch.bool)
    for kind in kinds:
        step = stream_mask(kind, L, GRID, conv_kernel=3).float()
        reach = (step @ reach.float()) > 0
    expected = reach[L + 1 :, L + 1 :]  # image query positions x image key positions
    got = influence(tiny(kinds))
    assert torch.equal(got, expected)
    assert not expected.all() and expected.any()  # the test is not vacuous
    assert not torch.equal(got, image_mask("dense", GRID)[:-1, :-1])  # sparser than dense


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
