import pytest
import torch
import torch.nn.functional as F

from dalle1 import transformer
from dalle1.config import DALLEConfig
from dalle1.transformer import DALLE, StreamShape, cross_entropy

SHAPE = StreamShape(text_vocab=40, text_len=5, image_vocab=24, grid=3, bos_id=1)


def model(attention="dense", **kw):
    torch.manual_seed(0)
    return DALLE(
        DALLEConfig(
            dim=32, depth=3, heads=2, dim_head=16, attention=attention, conv_kernel=3, **kw
        ),
        SHAPE,
    ).eval()


def batch(b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 40, (b, 5), generator=g), torch.randint(0, 24, (b, 9), generator=g)


def test_logit_split_shapes():
    text, codes = batch()
    text_logits, image_logits = model()(text, codes)
    assert text_logits.shape == (2, 5, 40)  # text positions score text tokens only
    assert image_logits.shape == (2, 9, 24)  # image positions score image codes only


@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_changing_a_later_token_never_changes_earlier_logits(attention):
    m = model(attention)
    text, codes = batch()
    t0, i0 = m(text, codes)
    codes2 = codes.clone()
    codes2[:, 4] = (codes2[:, 4] + 1) % 24  # code 4 is input position L + 1 + 4
    t1, i1 = m(text, codes2)
    assert torch.equal(t0, t1)
    assert torch.allclose(i0[:, :5], i1[:, :5], atol=0, rtol=0)  # logits for codes 0..4 predate it
    assert not torch.allclose(i0[:, 5:], i1[:, 5:])
    text2 = text.clone()
    text2[:, 3] = (text2[:, 3] + 1) % 40
    t2, _ = m(text2, codes)
    assert torch.equal(t0[:, :3], t2[:, :3]) and not torch.allclose(t0[:, 3:], t2[:, 3:])


def test_loss_is_the_weighted_sum_of_text_and_image_cross_entropy():
    text, codes = batch()
    for w in (0.125, 0.0, 1.0):
        m = model(text_loss_weight=w)
        loss, logs = m.loss(text, codes)
        text_logits, image_logits = m(text, codes)
        ce_text = torch.nn.functional.cross_entropy(text_logits.reshape(-1, 40), text.reshape(-1))
        ce_image = torch.nn.functional.cross_entropy(
            image_logits.reshape(-1, 24), codes.reshape(-1)
        )
        assert torch.allclose(logs["text_loss"], ce_text) and torch.allclose(
            logs["image_loss"], ce_image
        )
        assert torch.allclose(loss, w * ce_text + (1 - w) * ce_image)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_piece_by_piece_equals_torch(dtype, monkeypatch):
    # 7 rows of 24 codes per piece: 100 rows take 15 pieces, the last one short
    monkeypatch.setitem(transformer.LOSS_PIECE_BYTES, "cpu", 7 * 24 * 4)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(100, 24, generator=g)).to(dtype).requires_grad_()
    target = torch.randint(0, 24, (100,), generator=g)
    before = logits.detach().clone()
    loss = cross_entropy(logits, target)
    (grad,) = torch.autograd.grad(2.5 * loss, logits)
    ref = F.cross_entropy(logits.float(), target)
    (ref_grad,) = torch.autograd.grad(2.5 * ref, logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert (loss - ref).abs() <= 1e-6
    assert (grad.float() - ref_grad.float()).abs().max() <= (
        1e-7 if dtype == torch.float32 else 1e-3
    )
    assert torch.equal(logits.detach(), before)  # the softmax is rebuilt beside, not in place


def test_cross_entropy_keeps_only_the_logits_and_a_float_per_row():
    logits = torch.randn(64, 24, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, torch.randint(0, 24, (64,)))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    # the bf16 logits themselves, the targets and one float32 log-sum-exp per row: no
    # float32 copy of the logits (F.cross_entropy on logits.float() keeps 64 x 24 x 4 bytes)
    assert sum(storages.values()) == 64 * 24 * 2 + 64 * 8 + 64 * 4


@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_cached_logits_equal_full_recompute(attention):
    m = model(attention)
    text, codes = batch(3)
    _, full = m(text, codes)
    logits, cache = m.prefill(text)
    steps = [logits]
    for i in range(8):
        logits, cache = m.step(codes[:, i], i, cache)
        steps.append(logits)
    assert (torch.stack(steps, 1) - full).abs().max() <= 1e-4
    assert (m.next_logits_uncached(text, codes[:, :4]) - full[:, 4]).abs().max() <= 1e-4


def test_code_log_likelihood_matches_logits():
    m = model()
    text, codes = batch()
    ll = m.code_log_likelihood(text, codes)
    _, image_logits = m(text, codes)
    expected = image_logits.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1)
    assert ll.shape == (2, 9) and torch.allclose(ll, expected)


@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_plain_attention_switch_gives_the_flash_kernels_loss_and_gradients(attention):
    from dalle1.training.systems import set_flash_attention

    text, codes = batch()
    m = model(attention).train()

    def loss_and_grads():
        m.zero_grad(set_to_none=True)
        loss = m.loss(text, codes)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    flash_loss, flash_grads = loss_and_grads()
    assert set_flash_attention(m, False) is True  # returns the setting it replaced
    plain_loss, plain_grads = loss_and_grads()
    assert set_flash_attention(m, True) is False
    assert torch.allclose(flash_loss, plain_loss, atol=1e-6)
    assert len(flash_grads) == len(plain_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(flash_grads, plain_grads))


def test_long_dense_streams_keep_the_fused_kernel_without_flash(monkeypatch):
    # the plain products build (S, S) scores: past PLAIN_DENSE_MAX positions the fused
    # kernel is faster even where bf16 makes its backward slow
    import dalle1.transformer as tr

    chosen = []
    real = tr.dense_attention

    def spy(dropout_p=0.0, flash=True):
        chosen.append(flash)
        return real(dropout_p, flash)

    monkeypatch.setattr(tr, "dense_attention", spy)
    m = model("dense")
    m.flash = False
    text, codes = batch()
    m(text, codes)
    assert chosen and not any(chosen)  # a short stream: the plain products
    monkeypatch.setattr(tr, "PLAIN_DENSE_MAX", text.shape[1])  # now the stream is longer
    chosen.clear()
    m(text, codes)
    assert chosen and all(chosen)


# --- the full forward against x-transformers' own, old model folders, the meta device ------

# The parameter names of a model folder written before the sparse layers got their own
# forward (dim 16, depth 1): they must keep loading.
OLD_KEYS = [
    "text_emb.weight",
    "image_emb.weight",
    "text_pos.weight",
    "row_pos.weight",
    "col_pos.weight",
    "layers.0.layers.0.0.0.gamma",
    "layers.0.layers.0.1.to_q.weight",
    "layers.0.layers.0.1.to_k.weight",
    "layers.0.layers.0.1.to_v.weight",
    "layers.0.layers.0.1.to_out.weight",
    "layers.0.layers.1.0.0.gamma",
    "layers.0.layers.1.1.ff.0.0.weight",
    "layers.0.layers.1.1.ff.0.0.bias",
    "layers.0.layers.1.1.ff.2.weight",
    "layers.0.layers.1.1.ff.2.bias",
    "norm.weight",
    "norm.bias",
    "to_text_logits.weight",
    "to_text_logits.bias",
    "to_image_logits.weight",
    "to_image_logits.bias",
]


def xtransformers_logits(m: DALLE, text: torch.Tensor, codes: torch.Tensor):
    """The forward as it ran before: each x-transformers Decoder layer with the stream
    mask as an additive bias (None = its own causal mask for dense)."""
    L = m.shape.text_len
    x = torch.cat([m.embed_text(text), m.embed_codes(codes[:, :-1])], dim=1)
    for layer, kind in zip(m.layers, m.kinds):
        x = layer(x, attn_bias=m.attn_bias(kind, 0, x.shape[1]))
    h = m.norm(x)
    return m.to_text_logits(h[:, :L]), m.to_image_logits(h[:, L:])


@pytest.mark.parametrize(
    "kinds", [["dense"] * 2, ["row", "column", "conv"], ["column", "row", "row", "conv"]]
)
@pytest.mark.parametrize("text_len, grid", [(5, 3), (6, 8)])
def test_full_forward_equals_the_xtransformers_layers(kinds, text_len, grid):
    torch.manual_seed(0)
    shape = StreamShape(text_vocab=40, text_len=text_len, image_vocab=24, grid=grid, bos_id=1)
    cfg = DALLEConfig(dim=32, depth=len(kinds), heads=2, dim_head=16, conv_kernel=5)
    m = DALLE(cfg, shape, kinds=kinds).train()  # dropout 0: train mode is deterministic
    g = torch.Generator().manual_seed(2)
    text = torch.randint(0, 40, (2, text_len), generator=g)
    codes = torch.randint(0, 24, (2, grid * grid), generator=g)
    ours, theirs = m(text, codes), xtransformers_logits(m, text, codes)
    grads = []
    for logits in (ours, theirs):
        loss = sum(
            (t * torch.randn(t.shape, generator=torch.Generator().manual_seed(3))).sum()
            for t in logits
        )
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-5
    for a, b in zip(*grads):  # parameter gradients sum over the stream: relative 1e-5
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1)


def test_a_model_folder_written_before_loads_with_the_same_dense_outputs(tmp_path):
    from safetensors.torch import load_file, save_file

    from dalle1.checkpoint import load_dalle, save_dalle

    shape = StreamShape(text_vocab=12, text_len=2, image_vocab=8, grid=2, bos_id=1)
    m = DALLE(DALLEConfig(dim=16, depth=1, heads=2, dim_head=8), shape)
    save_dalle(m, tmp_path / "new")
    assert sorted(load_file(tmp_path / "new" / "model.safetensors")) == sorted(OLD_KEYS)
    # an "old" folder: the same names, other weights, written without dalle1's help
    torch.manual_seed(7)
    old = DALLE(DALLEConfig(dim=16, depth=1, heads=2, dim_head=8), shape)
    save_dalle(old, tmp_path / "old")
    save_file(
        {k: t.contiguous() for k, t in old.state_dict().items()},
        tmp_path / "old" / "model.safetensors",
    )
    loaded = load_dalle(tmp_path / "old")
    text, codes = torch.tensor([[3, 4], [5, 0]]), torch.tensor([[1, 2, 3, 4], [0, 7, 6, 5]])
    with torch.no_grad():
        for a, b in zip(loaded(text, codes), xtransformers_logits(old.eval(), text, codes)):
            assert (a - b).abs().max() <= 1e-6


def test_construction_on_the_meta_device():
    shape = StreamShape(text_vocab=40, text_len=5, image_vocab=24, grid=4, bos_id=1)
    cfg = DALLEConfig(dim=32, depth=3, heads=2, dim_head=16, attention="dalle", conv_kernel=3)
    with torch.device("meta"):
        m = DALLE(cfg, shape)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert list(m.buffers()) == []  # no mask buffers: the tables are built on first use
    ref = DALLE(cfg, shape)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    # materialised afterwards (as FSDP does), it runs and its masks are the CPU model's
    m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    text, codes = torch.randint(0, 40, (1, 5)), torch.randint(0, 24, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(text, codes)[1], ref.eval()(text, codes)[1])


def test_the_paper_model_builds_on_the_meta_device_in_seconds():
    import time

    from dalle1.config import load_config

    cfg = load_config("configs/paper_dalle.yaml")
    L, d = cfg.text.text_len, cfg.dalle.dim
    shape = StreamShape(cfg.text.vocab_size + L, L, cfg.vae.codebook_size, 32, bos_id=1)
    start = time.perf_counter()
    with torch.device("meta"):
        m = DALLE(cfg.dalle, shape)
    assert time.perf_counter() - start < 10
    width = cfg.dalle.heads * cfg.dalle.dim_head
    per_layer = 2 * d + 4 * d * width + (d * 4 * d + 4 * d) + (4 * d * d + d)
    embeddings = (shape.text_vocab + shape.image_vocab + L + 1 + 2 * 32) * d
    heads = (d + 1) * (shape.text_vocab + shape.image_vocab)
    expected = embeddings + cfg.dalle.depth * per_layer + 2 * d + heads
    assert sum(p.numel() for p in m.parameters()) == expected
    assert 12.0e9 < expected < 12.5e9  # "a 12-billion parameter ... transformer"


@pytest.mark.parametrize("grid", [5, 8])
def test_cached_decoding_equals_the_full_forward_under_the_paper_schedule(grid):
    shape = StreamShape(text_vocab=40, text_len=6, image_vocab=24, grid=grid, bos_id=1)
    torch.manual_seed(0)
    cfg = DALLEConfig(dim=32, depth=6, heads=2, dim_head=16, attention="dalle", conv_kernel=5)
    m = DALLE(cfg, shape).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 40, (2, 6), generator=g)
    codes = torch.randint(0, 24, (2, grid * grid), generator=g)
    with torch.no_grad():
        _, full = m(text, codes)
        logits, cache = m.prefill(text)
        steps = [logits]
        for i in range(grid * grid - 1):
            logits, cache = m.step(codes[:, i], i, cache)
            steps.append(logits)
        assert (torch.stack(steps, 1) - full).abs().max() <= 1e-4
        for n in (3, grid * grid // 2):  # a shorter stream: a prefix of the codes
            assert (m.next_logits_uncached(text, codes[:, :n]) - full[:, n]).abs().max() <= 1e-4


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_a_layer_keeps_no_float32_copy_of_its_normed_inputs(attention, autocast):
    # each norm is one F.layer_norm with the gain as its weight: its backward keeps the
    # input (the residual stream, before each sub-layer), not a normed copy as
    # x-transformers' LayerNorm (layer norm, then a product by the gain) does; the output
    # equals x-transformers' own
    torch.manual_seed(0)
    cfg = DALLEConfig(dim=32, depth=1, heads=2, dim_head=8, attention=attention, conv_kernel=3)
    m = DALLE(cfg, SHAPE).train()
    with torch.no_grad():  # a gain that is not all ones, so that it has to be applied
        for p in m.layers.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 5 + 9, 32, requires_grad=True)
    kept: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 and t.numel() == x.numel():  # (B, S, dim) float32
            kept.add(t.untyped_storage().data_ptr())
        return t

    with (
        torch.autocast("cpu", torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        out = m._layer(0, m.kinds[0], x)
    # the two residual-stream inputs; in float32 the projections keep the two normed
    # inputs they read as well (under autocast they keep bf16 casts instead)
    assert len(kept) == (2 if autocast else 4)
    if not autocast:
        theirs = m.layers[0](x, attn_bias=m.attn_bias(m.kinds[0], 0, x.shape[1]))
        assert (out - theirs).abs().max() <= 1e-5
        grads = torch.autograd.grad(out.square().sum(), [x, *m.layers.parameters()])
        reference = torch.autograd.grad(theirs.square().sum(), [x, *m.layers.parameters()])
        for a, b in zip(grads, reference):
            assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())


@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_under_autocast_a_layer_keeps_one_cast_of_each_normed_input(attention):
    # q, k and v read one bf16 cast of the normed input: the backward keeps it once, not
    # three times; the feed-forward keeps its own (so two per layer); and the layer's
    # output stays x-transformers' own under autocast, to bf16's precision
    torch.manual_seed(0)
    cfg = DALLEConfig(dim=32, depth=1, heads=2, dim_head=8, attention=attention, conv_kernel=3)
    m = DALLE(cfg, SHAPE).train()  # attention 16 wide: only the normed inputs are 32 wide
    x = torch.randn(2, 5 + 9, 32, requires_grad=True)
    kept: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16 and t.numel() == x.numel():  # (B, S, dim), any view
            kept[t.untyped_storage().data_ptr()] = t.shape
        return t

    with (
        torch.autocast("cpu", torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        out = m._layer(0, m.kinds[0], x)
    assert len(kept) == 2
    with torch.autocast("cpu", torch.bfloat16):
        ours = m._layer(0, m.kinds[0], x)
        lay = m.layers[0]
        theirs = lay(x, attn_bias=m.attn_bias(m.kinds[0], 0, x.shape[1]))
    assert torch.equal(out, ours)
    assert (ours.float() - theirs.float()).abs().max() <= 5e-2  # both in bf16 products
