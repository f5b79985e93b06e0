import torch

from dalle1.masks import image_mask, layer_kinds, stream_mask


def grid_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_row_and_column_masks_on_a_2x2_grid():
    # codes in raster order: 0 1 / 2 3
    assert torch.equal(
        image_mask("row", 2), grid_of([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    )
    assert torch.equal(
        image_mask("column", 2), grid_of([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]])
    )


def test_conv_mask_is_a_causal_window():
    m = image_mask("conv", 4, conv_kernel=3)
    q = 2 * 4 + 2  # row 2, col 2
    allowed = {int(k) for k in m[q].nonzero()}
    assert allowed == {1 * 4 + 1, 1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 1, 2 * 4 + 2}


def test_stream_mask_text_is_seen_by_all_and_is_causal():
    L, g = 3, 3
    for kind in ("dense", "row", "column", "conv"):
        m = stream_mask(kind, L, g, 3)
        assert m.shape == (L + g * g, L + g * g)
        assert not m.triu(1).any()  # causal
        assert m[:, : L + 1].tril().equal(torch.ones(L + g * g, L + 1, dtype=torch.bool).tril())


def test_paper_layer_schedule():
    kinds = layer_kinds(8, "dalle")
    assert kinds == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_kinds(3, "dense") == ["dense"] * 3
