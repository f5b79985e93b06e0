"""The cached decode step: key reads, the static (compiled / captured) form, the fallback."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import dalle1.decoding as decoding
from dalle1.config import DALLEConfig
from dalle1.decoding import (
    PACKED_ROWS,
    SERIAL_ROWS,
    SPINNING_SERIAL_ROWS,
    WEIGHT_MAJOR_ROWS,
    Matrix,
    StepRunner,
    attend,
    attention_dtype,
    cache_dtype,
    decode_mode,
    decode_threads,
    intra_op_threads,
    key_reads,
    openmp_spins_long,
    read_threads,
    runs,
    static_step,
)
from dalle1.masks import stream_mask
from dalle1.sampling import pick, sample_codes
from dalle1.transformer import DALLE, StreamShape, _layer_parts

SHAPE = StreamShape(text_vocab=40, text_len=5, image_vocab=24, grid=4, bos_id=1)
ALL_KINDS = ["dense", "row", "column", "conv"]


def make(kinds=None, attention="dense", seed=0) -> DALLE:
    torch.manual_seed(seed)
    depth = len(kinds) if kinds else 3
    cfg = DALLEConfig(dim=32, depth=depth, heads=2, dim_head=16, attention=attention, conv_kernel=3)
    return DALLE(cfg, SHAPE, kinds=kinds).eval()


def text(b=2, seed=2):
    return torch.randint(2, 35, (b, 5), generator=torch.Generator().manual_seed(seed))


def test_runs_are_the_fewest_greedy_arithmetic_progressions():
    assert runs([0, 1, 2, 3, 7, 8, 9]) == [slice(0, 4, 1), slice(7, 10, 1)]
    assert runs([0, 1, 2, 5, 9, 13]) == [slice(0, 3, 1), slice(5, 14, 4)]
    assert runs([4]) == [slice(4, 5, 1)]
    assert runs([]) == []


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_key_reads_name_exactly_the_allowed_keys(kind):
    mask = stream_mask(kind, 5, 6, conv_kernel=3)
    reads = key_reads(mask)
    for p, read in enumerate(reads):
        if isinstance(read, torch.Tensor):
            got = read.tolist()
        else:
            got = [i for s in read for i in range(s.start, s.stop, s.step)]
        assert got == mask[p].nonzero().flatten().tolist()
    if kind != "conv":  # the text and one window: views of the cache, never a gather
        assert all(isinstance(r, tuple) and len(r) <= 2 for r in reads)


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_attend_over_views_equals_masked_attention(kind, cache, amx, monkeypatch):
    # a bfloat16 cache (cache_dtype) is attended in bfloat16 only on a CPU with AMX; without,
    # its keys are converted as read, so the answer is exact attention of the rounded keys
    monkeypatch.setattr(decoding, "_cpu_has_amx", lambda: amx)
    exact = cache == torch.float32 or not amx
    g = torch.Generator().manual_seed(0)
    mask = stream_mask(kind, 5, 6, conv_kernel=3)
    S = mask.shape[0]
    keys, values = (torch.randn(2, 3, S, 8, generator=g).to(cache) for _ in range(2))
    for p, read in enumerate(key_reads(mask)):
        q = torch.randn(2, 3, 1, 8, generator=g)
        expected = F.scaled_dot_product_attention(
            q, keys.float(), values.float(), attn_mask=mask[p][None]
        )  # the cached keys as they are, attended exactly
        got = attend(q, keys, values, read)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() <= (1e-5 if exact else 2e-2)


def test_a_bfloat16_cache_is_attended_in_bfloat16_only_where_that_is_fast(monkeypatch):
    assert isinstance(decoding._cpu_has_amx(), bool)  # the real probe answers
    bf16, f32 = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 4, 8)
    monkeypatch.setattr(decoding, "_cpu_has_amx", lambda: False)  # e.g. AMD Zen 4
    assert attention_dtype(bf16, torch.float32) == torch.float32  # converted as read
    assert attention_dtype(f32, torch.float32) == torch.float32
    assert attention_dtype(bf16, torch.bfloat16) == torch.bfloat16  # bf16 weights: as is
    monkeypatch.setattr(decoding, "_cpu_has_amx", lambda: True)
    assert attention_dtype(bf16, torch.float32) == torch.bfloat16
    assert attention_dtype(f32, torch.float32) == torch.float32


def steps(model, t, codes, runner=None, cache_dtype=None):
    """Logits of prefill and every cached step, optionally through a StepRunner."""
    with torch.inference_mode():
        logits, cache = model.prefill(t, decode="eager", cache_dtype=cache_dtype)
        cache.runner = runner
        out = [logits]
        for i in range(codes.shape[1] - 1):
            logits, cache = model.step(codes[:, i], i, cache)
            out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "kinds", [["dense"] * 2, ["row", "column", "conv"], ALL_KINDS], ids=["dense", "dalle", "mixed"]
)
def test_static_step_equals_the_eager_step_and_full_recompute(kinds):
    # static_step is what torch.compile compiles and a CUDA graph captures; run it eagerly
    m = make(kinds)
    t = text(3)
    codes = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(1))
    eager = steps(m, t, codes)
    static = steps(m, t, codes, StepRunner("compile", static_step))
    with torch.no_grad():
        _, full = m(t, codes)
    assert (static - eager).abs().max() <= 1e-5
    assert (static - full).abs().max() <= 1e-4


def test_compiled_step_equals_eager_logits_and_greedy_codes():
    # one torch.compile (inductor) of the static step, for a model with every mask kind
    m = make(ALL_KINDS)
    t = text(2)
    codes = torch.randint(0, 24, (2, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        with torch.inference_mode():
            _, cache = m.prefill(t, decode="compile")
        runner = cache.runner
        compiled = steps(m, t, codes, runner)
        greedy = sample_codes(m, t, temperature=0, decode="compile")
    assert runner is not None and runner.mode == "compile" and not runner.failed
    assert (compiled - steps(m, t, codes)).abs().max() <= 1e-4
    assert torch.equal(greedy, sample_codes(m, t, temperature=0, decode="eager"))


@pytest.mark.parametrize("where", ["compiling", "calling"])
def test_a_failing_compile_falls_back_to_the_eager_step(monkeypatch, where):
    def broken_compile(fn, **kwargs):
        if where == "compiling":
            raise RuntimeError("torch.compile is not supported here")

        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    m = make(attention="dalle")
    t = text(2)
    expected = sample_codes(
        m, t, top_k=8, generators=[torch.Generator().manual_seed(s) for s in (1, 2)]
    )
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = sample_codes(
            m,
            t,
            top_k=8,
            generators=[torch.Generator().manual_seed(s) for s in (1, 2)],
            decode="compile",
        )
    assert torch.equal(got, expected)


def test_decode_mode_follows_the_argument_then_the_environment(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DALLE1_DECODE", raising=False)
    assert decode_mode(None, cpu) == "eager" and decode_mode(None, cuda) == "graph"
    assert decode_mode("graph", cpu) == "compile"  # no CUDA graphs without CUDA
    monkeypatch.setenv("DALLE1_DECODE", "compile")
    assert decode_mode(None, cpu) == "compile" and decode_mode("eager", cuda) == "eager"
    monkeypatch.setenv("DALLE1_DECODE", "eager")
    assert decode_mode(None, cuda) == "eager"  # the switch that turns compiling off
    with pytest.raises(ValueError, match="decode mode must be one of"):
        decode_mode("fast", cpu)


def test_the_cache_dtype_follows_the_argument_then_the_environment_then_the_weights(
    monkeypatch,
):
    monkeypatch.delenv("DALLE1_CACHE_DTYPE", raising=False)
    assert cache_dtype(None, torch.float32) == torch.float32  # default: exact decoding
    assert cache_dtype(None, torch.bfloat16) == torch.bfloat16
    assert cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert cache_dtype(torch.float16, torch.float32) == torch.float16
    monkeypatch.setenv("DALLE1_CACHE_DTYPE", "bfloat16")
    assert cache_dtype(None, torch.float32) == torch.bfloat16
    assert cache_dtype("float32", torch.float32) == torch.float32  # the argument wins
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        cache_dtype("int8", torch.float32)
    monkeypatch.setenv("DALLE1_CACHE_DTYPE", "int8")
    with pytest.raises(ValueError, match=r"cache dtype \(\$DALLE1_CACHE_DTYPE\) must be"):
        cache_dtype(None, torch.float32)
    monkeypatch.setenv("DALLE1_CACHE_DTYPE", "bfloat16")
    m = make()
    with torch.inference_mode():
        _, cache = m.prefill(text(2))
    assert {t.dtype for t in cache.keys + cache.values} == {torch.bfloat16}


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
@pytest.mark.parametrize("kinds", [["dense"] * 2, ALL_KINDS], ids=["dense", "mixed"])
def test_a_bfloat16_cache_decodes_close_to_the_float32_model(kinds, amx, monkeypatch):
    # the opt-in halves the bytes a step reads from the cache, at bfloat16's precision,
    # whichever dtype the CPU attends it in (attention_dtype)
    monkeypatch.setattr(decoding, "_cpu_has_amx", lambda: amx)
    m = make(kinds)
    t = text(3)
    codes = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, full = m(t, codes)
    eager = steps(m, t, codes, cache_dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        runner = StepRunner("compile", static_step)
        static = steps(m, t, codes, runner, cache_dtype="bfloat16")
    with torch.inference_mode():
        _, cache = m.prefill(t, cache_dtype="bfloat16")
    assert {k.dtype for k in cache.keys + cache.values} == {torch.bfloat16}
    assert eager.dtype == torch.float32  # the weights and the logits keep their dtype
    assert 0 < (eager - full).abs().max() <= 1e-2  # rounded keys, not an exact decode
    assert (static - eager).abs().max() <= 1e-2
    # sampling: the same API, the codes of a model whose cached keys were rounded
    greedy = sample_codes(m, t, temperature=0, cache_dtype="bfloat16")
    exact = sample_codes(m, t, temperature=0)
    assert greedy.shape == exact.shape and (greedy == exact).float().mean() >= 0.75


def test_small_cpu_batches_decode_on_one_thread_and_the_setting_comes_back(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    before = torch.get_num_threads()
    short = {"GOMP_SPINCOUNT": "1000"}  # a short spin (dalle1 sets 10,000, a long one)
    assert decode_threads(1, cpu, short) == decode_threads(SERIAL_ROWS - 1, cpu, short) == 1
    assert decode_threads(SERIAL_ROWS, cpu, short) == decode_threads(1, cuda, short) == before
    spinning = {}  # GNU OpenMP's default: a long spin
    assert decode_threads(SPINNING_SERIAL_ROWS - 1, cpu, spinning) == 1
    assert decode_threads(SPINNING_SERIAL_ROWS, cpu, spinning) == before
    m, t = make(ALL_KINDS), text(3)
    seen = []
    step = m.step

    def recording_step(*args):
        seen.append(torch.get_num_threads())
        return step(*args)

    monkeypatch.setattr(m, "step", recording_step)
    cached = sample_codes(m, t, temperature=0)
    assert seen == [1] * (SHAPE.num_codes - 1) and torch.get_num_threads() == before
    assert torch.equal(cached, sample_codes(m, t, temperature=0, use_cache=False))
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError  # an error inside still restores the count
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "env, long",
    [
        ({}, True),  # libgomp's default: 300,000 spins
        ({"GOMP_SPINCOUNT": "1000"}, False),
        ({"GOMP_SPINCOUNT": "10000"}, True),  # what dalle1 sets before torch loads
        ({"GOMP_SPINCOUNT": "300000"}, True),
        ({"GOMP_SPINCOUNT": "infinity"}, True),
        ({"GOMP_SPINCOUNT": "lots"}, True),  # unreadable: libgomp keeps its default
        ({"OMP_WAIT_POLICY": "passive"}, False),
        ({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "lots"}, False),
        ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"}, True),  # the count wins
        ({"OMP_WAIT_POLICY": "ACTIVE"}, True),
        ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "0"}, False),
    ],
)
def test_the_openmp_wait_policy_is_read_from_the_environment(env, long):
    assert openmp_spins_long(env) is long


def test_decoding_sees_weights_updated_in_place():
    # the stacked q/k/v are rebuilt when a weight changes (e.g. sampling between updates)
    m = make(attention="dalle")
    t = text(2)
    codes = torch.randint(0, 24, (2, 16), generator=torch.Generator().manual_seed(1))
    before = steps(m, t, codes)
    with torch.no_grad():
        m.layers[1].layers[0][1].to_k.weight.mul_(1.5)  # in place, as an optimizer step does
        _, full = m(t, codes)
    after = steps(m, t, codes)
    assert not torch.allclose(before, after)
    assert (after - full).abs().max() <= 1e-4


def test_moving_the_model_rebuilds_the_decode_weights():
    m = make(attention="dalle")
    t = text(2)
    a = sample_codes(m, t, temperature=0)
    m.to(torch.float64)
    assert m.decode_weights().layers[0].qkv.weight.dtype == torch.float64
    b = sample_codes(m, t, temperature=0)
    assert torch.equal(a, b)


def test_per_row_draws_equal_a_per_row_multinomial():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(5, 64, generator=g) * 3
        probs = logits.softmax(-1)
        seeds = torch.randint(0, 2**31, (5,), generator=g).tolist()
        expected = torch.cat(
            [
                torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s))
                for p, s in zip(probs, seeds)
            ]
        )
        got = pick(logits, 1.0, [torch.Generator().manual_seed(s) for s in seeds])
        assert torch.equal(got, expected)


@pytest.mark.parametrize("rows", [1, PACKED_ROWS, 8, 50])
@pytest.mark.parametrize("gelu", [False, True])
def test_a_packed_matrix_multiplies_as_the_plain_product(rows, gelu):
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(64, 96, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 2, 64, generator=g)  # any leading shape: (rows, 2) rows of 64
    expected = x @ weight + bias
    expected = F.gelu(expected) if gelu else expected
    packed = Matrix(weight, bias).pack()
    assert decoding.packing_available() and packed.packed is not None
    got = packed(x, gelu=gelu)
    assert got.shape == (rows, 2, 96)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert packed.nbytes() == (64 * 96 + 96) * 4  # the packed copy is not counted twice


@pytest.mark.parametrize("rows", [1, WEIGHT_MAJOR_ROWS, PACKED_ROWS])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
def test_every_form_of_a_product_equals_the_plain_one(rows, bias, gelu):
    # one row: input-major (wide) or out-major (narrow); two rows: turned around, (W xᵀ)ᵀ;
    # three or more: packed. Each form against x @ W + b, wide and narrow matrices alike.
    g = torch.Generator().manual_seed(rows)
    for n_in, n_out in ((32, 96), (96, 32)):
        b = torch.randn(n_out, generator=g) if bias else None
        m = Matrix(torch.randn(n_in, n_out, generator=g), b).pack()
        assert m.out_major.shape == (n_out, n_in) and m.out_major.is_contiguous()
        assert torch.equal(m.out_major, m.weight.t())
        x = torch.randn(rows, 1, n_in, generator=g)  # (B, n = 1, in), as the step calls it
        expected = x @ m.weight + (0 if b is None else b)
        expected = F.gelu(expected) if gelu else expected
        got = m(x, gelu=gelu)
        assert got.shape == (rows, 1, n_out) and got.is_contiguous()
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_two_rows_take_the_turned_around_product(monkeypatch):
    m = Matrix(torch.randn(16, 24), torch.randn(24)).pack()
    calls = []
    turned = Matrix._turned_around
    monkeypatch.setattr(
        Matrix, "_turned_around", lambda self, f: calls.append(len(f)) or turned(self, f)
    )
    for rows in (1, 2, 3, 8):
        m(torch.randn(rows, 16))
    assert calls == [WEIGHT_MAJOR_ROWS]


def test_the_out_major_form_is_the_layers_own_weight_not_a_copy():
    model = make(["dense", "row"])
    params = {p.data_ptr() for p in model.parameters()}
    for layer, (_, attn, _, _ff) in zip(
        model.decode_weights().layers, map(_layer_parts, model.layers)
    ):
        for matrix in (layer.out, layer.ff_in, layer.ff_out):
            assert matrix.out_major.data_ptr() in params
            assert torch.equal(matrix.out_major, matrix.weight.t())
        stacked = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        assert torch.equal(layer.qkv.out_major, stacked)  # one concatenation, kept once


def test_packing_applies_to_cpu_float32_only_and_can_be_absent(monkeypatch):
    weight = torch.randn(8, 8)
    double = Matrix(weight.double()).pack()
    assert double.packed is None and double.out_major is None  # float32 only
    monkeypatch.setattr(decoding, "packing_available", lambda: False)
    plain = Matrix(weight).pack()
    assert plain.packed is None
    x = torch.randn(PACKED_ROWS + 1, 8)
    assert torch.equal(plain(x), x @ weight)


def test_a_failing_reorder_or_a_large_model_decodes_unpacked(monkeypatch):
    def broken(*args):
        raise RuntimeError("oneDNN: unsupported platform")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    weight = torch.randn(16, 8)
    m = Matrix(weight).pack()
    assert m.packed is None and m.out_major is not None  # the (out, in) copy needs no oneDNN
    x = torch.randn(PACKED_ROWS + 2, 16)
    assert (m(x) - x @ weight).abs().max() <= 1e-5
    monkeypatch.undo()
    model = make(["dense", "row"])
    monkeypatch.setattr(decoding, "PACK_MAX_BYTES", 1000)  # smaller than any model here
    model.reset_parameters()
    w = model.decode_weights()
    assert all(layer.qkv.packed is None for layer in w.layers)
    # the (out, in) form of a large model costs nothing: it is the layer's own weight
    params = {p.data_ptr() for p in model.parameters()}
    assert all(layer.ff_out.out_major.data_ptr() in params for layer in w.layers)
    t = text(4)
    codes = torch.randint(0, 24, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, full = model(t, codes)
    assert (steps(model, t, codes) - full).abs().max() <= 1e-4


def test_packed_decoding_equals_plain_decoding_and_the_full_forward(monkeypatch):
    # 8 rows take the packed products; the same model without packing takes the plain ones
    m = make(["dense", "row", "column", "conv"])
    t = text(8)
    codes = torch.randint(0, 24, (8, 16), generator=torch.Generator().manual_seed(1))
    assert m.decode_weights().layers[0].ff_in.packed is not None
    packed = steps(m, t, codes)
    monkeypatch.setattr(decoding, "packing_available", lambda: False)
    m.reset_parameters()  # drop the derived decode weights: rebuilt without packing
    assert m.decode_weights().layers[0].ff_in.packed is None
    plain = steps(m, t, codes)
    with torch.no_grad():
        _, full = m(t, codes)
    assert (packed - plain).abs().max() <= 1e-5
    assert (packed - full).abs().max() <= 1e-4


def test_the_last_level_cache_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    (tmp_path / "index4").mkdir()  # no size file: skipped
    assert decoding.last_level_cache_bytes(tmp_path) == 32 << 20
    assert decoding.last_level_cache_bytes(tmp_path / "absent") == 0


def test_reads_go_parallel_sooner_when_a_step_streams_from_memory(monkeypatch):
    llc = 32 << 20
    assert decoding.parallel_read_bytes(50 << 20, llc) == decoding.STREAMED_READ_BYTES
    assert decoding.parallel_read_bytes(20 << 20, llc) == decoding.PARALLEL_READ_BYTES
    assert decoding.parallel_read_bytes(50 << 20, 0) == decoding.PARALLEL_READ_BYTES  # unknown
    assert decoding.STREAMED_READ_BYTES < decoding.PARALLEL_READ_BYTES
    # prefill counts the weights and every layer's keys and values of the batch
    m, t = make(["dense"] * 2), text(3)
    w, shape = m.decode_weights(), m.shape
    per_layer = 2 * 3 * w.heads * (shape.text_len + shape.num_codes) * w.dim_head * 4
    working_set = w.nbytes() + 2 * per_layer
    for llc, expected in ((working_set - 1, "STREAMED"), (working_set, "PARALLEL")):
        monkeypatch.setattr(decoding, "last_level_cache_bytes", lambda llc=llc: llc)
        _, cache = m.prefill(t)
        assert cache.parallel_from == getattr(decoding, f"{expected}_READ_BYTES")


def test_a_large_read_runs_on_every_thread_inside_a_one_thread_step(monkeypatch):
    keys = torch.zeros(8, 8, 1024, 32)  # 2 x 8 x 8 x 512 x 32 x 4 bytes = 8 MB for 512 keys
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's own setting, which a large read goes back to
    try:
        with intra_op_threads(1):
            assert read_threads(keys, (slice(0, 512, 1),)) == 2
            assert read_threads(keys, (slice(0, 384, 1),)) == 2  # 384 keys: 6 MB
            assert read_threads(keys, (slice(0, 383, 1),)) == 1
            assert read_threads(keys, (slice(0, 8, 1), slice(8, 520, 64))) == 1  # 256 KB
            long = torch.zeros(2, 8, 4096, 32)  # 16 (row, head) pairs, 8 MB for 2048 keys
            assert read_threads(long, (slice(0, 2048, 1),)) == 2
            assert read_threads(long[:1], (slice(0, 4096, 1),)) == 1  # one row's 8 heads
            # a lower threshold (reads that stream from memory): 128 keys are 2 MB
            assert read_threads(keys, (slice(0, 128, 1),), threshold=2 << 20) == 2
            assert read_threads(keys, (slice(0, 127, 1),), threshold=2 << 20) == 1
            assert read_threads(keys, (slice(0, 128, 1),)) == 1  # the default: 6 MB
        assert read_threads(keys, (slice(0, 512, 1),)) == 2  # outside: torch's own setting
    finally:
        torch.set_num_threads(before)
    # the same codes whichever way the reads are threaded
    m, t = make(ALL_KINDS), text(3)
    serial = sample_codes(m, t, temperature=0)
    monkeypatch.setattr(decoding, "PARALLEL_READ_BYTES", 0)  # every read on every thread
    monkeypatch.setattr(decoding, "PARALLEL_READ_HEADS", 0)
    assert torch.equal(sample_codes(m, t, temperature=0), serial)
