"""dalle1.attention: blocked sparse attention equals masked dense attention, forward and backward."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from dalle1 import attention
from dalle1.attention import _add_every, block_plan, default_block, sparse_attention
from dalle1.masks import allowed


def reference(q, k, v, kind, text, grid, kernel):
    """Plain attention over the whole stream under the boolean stream mask."""
    pos = torch.arange(q.shape[1])
    mask = allowed(kind, text, grid, pos, pos, kernel)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2).flatten(2)


def inputs(text, codes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, text + codes, 3, 8, generator=g, dtype=dtype).requires_grad_()
        for _ in range(3)
    ]


def forward_and_grads(fn, qkv, out_grad):
    out = fn(*qkv)
    return out, torch.autograd.grad(out, qkv, out_grad)


# (text positions, grid, image codes present, conv kernel, block size or None)
CASES = [
    (6, 4, 15, 3, None),  # Figure 11's shape, the input stream (last code never an input)
    (6, 4, 16, 3, None),  # ... and every code
    (7, 5, 24, 3, None),  # text not a multiple of anything
    (33, 8, 63, 11, None),  # conv blocks of two rows, the 11×11 kernel
    (5, 6, 35, 5, 7),  # a block size that divides neither the grid nor the codes
    (9, 7, 20, 3, None),  # a prefix: codes stop mid-row
    (3, 9, 80, 11, 5),
    (4, 3, 0, 3, None),  # text only
    (2, 1, 1, 3, None),  # a 1×1 grid
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text, grid, codes, kernel, block", CASES)
def test_blocked_attention_equals_masked_attention(kind, text, grid, codes, kernel, block, fused):
    plan = block_plan(kind, text, grid, kernel, block=block)
    assert_equals_reference(plan, codes, kernel, fused)


def assert_equals_reference(plan, codes: int, kernel: int, fused: bool) -> None:
    """``sparse_attention`` under ``plan`` equals masked attention, output and gradients."""
    kind, text, grid = plan.kind, plan.text, plan.grid
    qkv = inputs(text, codes)
    out_grad = torch.randn(2, text + codes, 24, generator=torch.Generator().manual_seed(1))
    want, want_grads = forward_and_grads(
        lambda q, k, v: reference(q, k, v, kind, text, grid, kernel), qkv, out_grad
    )
    got, got_grads = forward_and_grads(
        lambda q, k, v: sparse_attention(q, k, v, plan, fused=fused), qkv, out_grad
    )
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    for a, b in zip(got_grads, want_grads):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_many_chunks_equal_masked_attention(kind, fused):
    # long streams run their blocks in chunks; tiny budgets force several per layer
    text, grid, codes, kernel = 7, 8, 63, 5
    plan = block_plan(kind, text, grid, kernel)
    with (
        mock.patch.object(attention, "CHUNK_ROWS", 1),
        mock.patch.object(attention, "CHUNK_SCORES", 1),
    ):
        chunks = attention._chunks(plan, len(plan.queries), text + codes, 8, not fused)
        assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == len(plan.queries)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous runs
        sizes = [hi - lo for lo, hi in chunks]
        assert max(sizes) - min(sizes) <= 1  # of equal size: the largest sets the peak
        assert_equals_reference(plan, codes, kernel, fused)


def test_chunk_scores_stay_within_their_budget():
    # the paper's 48×48 grid: conv's scores would be 11.5 times the queries in one chunk
    size, dim = 33 + 48 * 48 - 1, 32
    for kind in ("row", "column", "conv"):
        plan = block_plan(kind, 33, 48, 11)
        chunks = attention._chunks(plan, len(plan.queries), size, dim)
        width = plan.keys.shape[1]
        for lo, hi in chunks:
            assert (hi - lo) * plan.block * width <= attention.CHUNK_SCORES * size * dim
            assert (hi - lo) * width <= attention.CHUNK_ROWS * size
        assert len(chunks) == (3 if kind == "conv" else 1)
        # the fused kernel keeps no scores: only the gathered keys bound its chunks
        fused = attention._chunks(plan, len(plan.queries), size, dim, products=False)
        assert len(fused) == 1


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_projection_is_applied_piece_by_piece(kind):
    text, grid = 5, 6
    plan = block_plan(kind, text, grid, 3)
    qkv = inputs(text, grid * grid - 1, seed=2, dtype=torch.float64)
    proj = torch.nn.Linear(24, 7, dtype=torch.float64)
    out_grad = torch.randn(2, text + grid * grid - 1, 7, dtype=torch.float64)
    want, want_grads = forward_and_grads(
        lambda q, k, v: proj(reference(q, k, v, kind, text, grid, 3)), qkv, out_grad
    )
    got, got_grads = forward_and_grads(
        lambda q, k, v: sparse_attention(q, k, v, plan, project=proj), qkv, out_grad
    )
    assert (got - want).abs().max() <= 1e-12
    for a, b in zip(got_grads, want_grads):
        assert (a - b).abs().max() <= 1e-12


def test_blocks_read_only_a_window():
    # the point of the blocks: keys per query follow the mask, not the stream length
    for grid in (16, 32, 48):
        text = 33
        row, column, conv = (block_plan(k, text, grid, 11) for k in ("row", "column", "conv"))
        assert row.keys.shape[1] == text + 2 * grid  # its own row and the one above
        assert column.keys.shape[1] == text + grid  # its own column
        assert conv.keys.shape[1] == text + 5 * grid + 5 + default_block("conv", grid)
        for plan in (row, column, conv):
            assert plan.mask.shape == (len(plan.queries), plan.block, plan.keys.shape[1])


def test_both_kernels_take_two_row_conv_blocks():
    # conv's window reaches five rows back: a second row of queries adds a sixth of the keys
    assert default_block("conv", 32) == 64 and block_plan("conv", 33, 32, 11).block == 64
    assert default_block("conv", 4) == 4  # rows shorter than 8 codes: one row
    assert default_block("row", 32) == default_block("column", 32) == 32


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_matmul_blocks_under_bf16_autocast_stay_close_to_float32(kind):
    # bf16 training on a CPU takes the matmul blocks, on the bf16 q, k, v of the
    # projections: products, softmax and its backward pass in bf16
    text, grid = 6, 4
    plan = block_plan(kind, text, grid, 3)
    q, k, v = inputs(text, grid * grid - 1, seed=3)
    want = reference(q, k, v, kind, text, grid, 3)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", torch.bfloat16):
        got = sparse_attention(*low, plan, fused=False)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max() <= 0.05  # bf16 rounding, not a wrong mask
    # the hand-written backward pass against autograd through the float32 reference
    out_grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(4))
    want_grads = torch.autograd.grad(want, (q, k, v), out_grad)
    got_grads = torch.autograd.grad(got, low, out_grad.bfloat16())
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert (a.float() - b).abs().max() <= 0.02 * b.abs().max()  # bf16 rounding: ~0.008


def test_gathered_blocks_are_not_kept_for_the_backward_pass():
    # SDPA keeps its inputs; the gathered (repeated) keys must be regathered, not kept
    text, grid = 33, 16
    plan = block_plan("conv", text, grid, 11)
    q, k, v = inputs(text, grid * grid - 1)
    width, dim = plan.keys.shape[1], q.shape[-1]
    kept = []
    hooks = torch.autograd.graph.saved_tensors_hooks

    def keeping(inner_pack, inner_unpack):  # record what attention.py's own hooks keep
        def pack(t):
            saved = inner_pack(t)
            if isinstance(saved, torch.Tensor):
                kept.append(saved)
            return saved

        return hooks(pack, inner_unpack)

    with mock.patch.object(torch.autograd.graph, "saved_tensors_hooks", keeping):
        out = sparse_attention(q, k, v, plan)
    assert kept
    assert not any(t.shape[-2:] in ((width, dim), (dim, width)) for t in kept)  # no key blocks
    out.sum().backward()  # and the backward pass still works from what was kept
    assert k.grad is not None and k.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_fused_layers_of_a_kind_share_one_mask_bias(kind):
    # SDPA keeps the mask it is given for the backward pass: given the boolean mask it
    # would convert and keep a float copy per call (per layer); the plan's bias is made
    # once per dtype, and every call keeps that same tensor
    text, grid = 7, 6
    plan = block_plan(kind, text, grid, 3)
    kept = []
    hooks = torch.autograd.graph.saved_tensors_hooks

    def keeping(inner_pack, inner_unpack):  # record what attention.py's own hooks keep
        def pack(t):
            saved = inner_pack(t)
            if isinstance(saved, torch.Tensor) and saved.dtype == torch.float32:
                kept.append(saved.untyped_storage().data_ptr())
            return saved

        return hooks(pack, inner_unpack)

    with mock.patch.object(torch.autograd.graph, "saved_tensors_hooks", keeping):
        for _ in range(2):  # two layers of the kind
            q, k, v = inputs(text, grid * grid - 1)
            sparse_attention(q, k, v, plan)
    bias = plan.bias(torch.float32)
    assert kept.count(bias.untyped_storage().data_ptr()) == 2
    assert plan.bias(torch.float32) is bias and plan.bias(torch.bfloat16).dtype == torch.bfloat16
    expected = torch.zeros(plan.mask.shape).masked_fill(~plan.mask, float("-inf"))
    assert torch.equal(bias[:, 0], expected)
    moved = block_plan(kind, text, grid, 3, device=torch.device("meta"))
    assert moved.biases == {} and moved.biases is not plan.biases  # its own, on its device


def test_matmul_blocks_keep_only_q_k_v():
    # what the products keep for the backward pass: q, k, v themselves; never a gathered
    # block, the (queries, keys) probabilities or the output (the fused softmax backward
    # needs no output)
    text, grid = 33, 16
    plan = block_plan("conv", text, grid, 11)
    q, k, v = inputs(text, grid * grid - 1)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sparse_attention(q, k, v, plan, fused=False)
    sources = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    assert {t.untyped_storage().data_ptr() for t in kept} == sources
    assert all(t.shape == q.shape for t in kept)  # as given, not as copies or blocks
    out.sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0


def test_plans_are_built_on_the_requested_device():
    plan = block_plan("row", 6, 4, device=torch.device("meta"))
    assert plan.mask.device.type == "meta" and plan.keys.device.type == "meta"


def test_matmul_blocks_leave_attention_dropout_to_the_fused_kernel():
    # the products have no dropout: with dropout_p > 0 the same plan runs the fused kernel
    text, grid = 6, 4
    plan = block_plan("row", text, grid, 3)
    q, k, v = inputs(text, grid * grid - 1)
    runs = []
    for fused in (False, True):
        torch.manual_seed(7)
        runs.append(sparse_attention(q, k, v, plan, dropout_p=0.5, fused=fused))
    assert torch.equal(runs[0], runs[1])
    plain = sparse_attention(q, k, v, plan, fused=False)
    assert runs[0].isfinite().all() and not torch.allclose(runs[0], plain)


@pytest.mark.parametrize("start, step, low, size", [(-7, 4, 2, 23), (3, 4, 0, 12), (-30, 5, 6, 14)])
@pytest.mark.parametrize("w", [1, 3, 4])
def test_windows_add_like_a_loop_over_their_rows(start, step, low, size, w):
    w = min(w, step)
    full = torch.randn(2, 3, size, 5, generator=torch.Generator().manual_seed(0))
    rows = torch.randn(2, 3, 6, w, 5, generator=torch.Generator().manual_seed(1))
    want = full.clone()
    for j in range(6):
        for i in range(w):
            if low <= start + j * step + i < size:
                want[:, :, start + j * step + i] += rows[:, :, j, i]
    _add_every(full, rows, start, step, low)
    assert torch.equal(full, want)


@pytest.mark.parametrize("kind", ["row", "conv"])
def test_paper_sized_row_and_conv_windows_are_runs(kind):
    # the matmul blocks add their key gradients back window by window (not index_add_)
    # when each block reads one run of codes: so for the paper's 32x32 grid and 11x11 conv
    plan = block_plan(kind, 257, 32, 11)
    image = plan.keys[:, 257:] - 257
    j = torch.arange(len(image))[:, None]
    run = j * plan.block + plan.window + torch.arange(image.shape[1])
    assert torch.equal(image, run.clamp(0, 32 * 32 - 1))
    assert block_plan("column", 257, 32, 11).window is None
