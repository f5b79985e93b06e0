"""The sampler: cache exactness, filters over the image vocabulary, seeds, batches, bf16."""

import pytest
import torch

from dalle1.config import DALLEConfig
from dalle1.sampling import SamplingOptions, draw, filter_logits, next_code, pick, sample_codes
from dalle1.transformer import DALLE, Cache, StreamShape

SHAPE = StreamShape(text_vocab=40, text_len=5, image_vocab=24, grid=4, bos_id=1)
NULL = torch.arange(35, 40)  # per-position pads: the empty caption


def make(attention: str) -> DALLE:
    torch.manual_seed(0)
    cfg = DALLEConfig(dim=32, depth=3, heads=2, dim_head=16, attention=attention, conv_kernel=3)
    return DALLE(cfg, SHAPE).eval()


@pytest.fixture(params=["dense", "dalle"])
def m(request):
    return make(request.param)


def text(b=3, seed=2):
    return torch.randint(2, 35, (b, 5), generator=torch.Generator().manual_seed(seed))


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_greedy_cached_equals_uncached(m):
    t = text()
    cached = sample_codes(m, t, temperature=0)
    uncached = sample_codes(m, t, temperature=0, use_cache=False)
    assert cached.shape == (3, 16) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)


def test_seeded_sampling_is_reproducible_and_cache_independent(m):
    t = text()
    a = sample_codes(m, t, generators=torch.Generator().manual_seed(5))
    b = sample_codes(m, t, generators=torch.Generator().manual_seed(5))
    c = sample_codes(m, t, generators=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 24
    d = sample_codes(m, t, generators=torch.Generator().manual_seed(6))
    assert not torch.equal(a, d)


def test_each_prompt_samples_the_same_alone_or_in_a_batch(m):
    t = text(3)
    together = sample_codes(m, t, top_k=10, generators=gens([7, 8, 9]))
    for i, seed in enumerate([7, 8, 9]):
        alone = sample_codes(m, t[i : i + 1], top_k=10, generators=gens([seed]))
        assert torch.equal(together[i : i + 1], alone)
    assert not torch.equal(together[0], together[1])  # different prompts, different samples


def test_filters_on_a_small_case():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # probabilities ~ .09 .67 .24 .03: top_p 0.7 keeps the two tokens that reach 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    assert torch.equal(filter_logits(logits, top_k=10, top_p=1.0), logits)  # no-ops


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (8, 0.5)])
def test_filtered_draws_never_leave_their_set_and_follow_the_renormalised_law(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 2
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    allowed = set(order[:64].tolist())
    if top_k is not None:
        allowed = set(order[:top_k].tolist())
    if top_p is not None:
        kept = probs[sorted(allowed)].sort(descending=True)
        renorm = kept.values / kept.values.sum()
        n = int((renorm.cumsum(0) - renorm < top_p).sum())  # smallest prefix reaching top_p
        allowed = set(torch.tensor(sorted(allowed))[kept.indices[:n]].tolist())
    draws = pick(
        filter_logits(logits.expand(40_000, -1), top_k, top_p),
        1.0,
        torch.Generator().manual_seed(1),
    )
    assert set(draws.unique().tolist()) == allowed  # every allowed code is drawn, nothing else
    target = torch.zeros(64)
    target[sorted(allowed)] = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
    freq = torch.bincount(draws, minlength=64).float() / len(draws)
    assert (freq - target).abs().max() < 0.015


def test_top_k_1_and_tiny_top_p_are_greedy(m):
    t = text()
    greedy = sample_codes(m, t, temperature=0)
    assert torch.equal(sample_codes(m, t, top_k=1, generators=gens([1, 2, 3])), greedy)
    assert torch.equal(sample_codes(m, t, top_p=1e-6, generators=gens([1, 2, 3])), greedy)


def test_temperature_sharpens(m):
    t = text(1).expand(64, -1)
    cold = sample_codes(m, t, temperature=0.05, generators=torch.Generator().manual_seed(0))
    hot = sample_codes(m, t, temperature=5.0, generators=torch.Generator().manual_seed(0))
    greedy = sample_codes(m, t[:1], temperature=0)
    # the first code: same logits for all 64 rows (later codes follow diverging prefixes)
    assert (cold[:, 0] == greedy[0, 0]).float().mean() > 0.9
    assert (hot[:, 0] == greedy[0, 0]).float().mean() < 0.5


def test_temperature_one_draws_what_scaled_logits_draw_at_their_temperature():
    # temperature 1 skips the division; halving the logits and drawing at 0.5 divides
    # them back exactly (a power of two), so both must draw the same codes
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))

    def codes(lg: torch.Tensor, t: float, **filters) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(len(lg))]
        return next_code(lg, SamplingOptions(temperature=t, **filters), gens)

    for filters in ({}, {"top_k": 8}, {"top_p": 0.9}):
        assert torch.equal(codes(logits, 1.0, **filters), codes(logits * 0.5, 0.5, **filters))
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    same = [torch.Generator().manual_seed(i) for i in range(6)]
    assert torch.equal(pick(logits, 1.0, gens), pick(logits * 2, 2.0, same))


def test_keep_mask_forces_codes_and_inputs_stay_unchanged(m):
    t = text(2)
    init = torch.randint(0, 24, (2, 16))
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, :4] = True
    keep[1, 9] = True
    before = (t.clone(), init.clone(), keep.clone())
    out = sample_codes(m, t, init_codes=init, keep=keep, generators=gens([0, 1]))
    assert torch.equal(out[keep], init[keep])
    for a, b in zip(before, (t, init, keep)):
        assert torch.equal(a, b)


def test_returned_codes_are_an_ordinary_tensor(m):
    out = sample_codes(m, text(1), temperature=0)
    out[0, 0] = 3  # would raise for an inference-mode tensor
    assert not out.is_inference()


def test_bf16_weights_decode_in_bf16_without_autocast_and_mostly_agree(monkeypatch):
    # Inference in the weights' own dtype: cast once, then nothing is autocast in the loop.
    fp32 = make("dalle")
    bf16 = make("dalle").to(torch.bfloat16)
    t = text(8)
    seen = []
    step = DALLE.step

    def watched(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DALLE, "step", watched)
    with torch.no_grad():
        _, cache = bf16.prefill(t)
    assert cache.keys[0].dtype == torch.bfloat16  # the cache is in the weights' dtype
    a = sample_codes(fp32, t, temperature=0)
    b = sample_codes(bf16, t, temperature=0)
    assert len(seen) == 2 * 15 and not any(any(s) for s in seen)  # no autocast, ever
    assert b.dtype == torch.long and b.shape == a.shape and 0 <= b.min() and b.max() < 24
    # Tolerance (measured on this model: 8 rows x 16 greedy codes): the first code of every
    # row agrees, and >= 3/4 of all codes; a greedy argmax flips where two logits lie
    # within bf16's ~3 significant digits, and a flip changes the rest of its row.
    assert torch.equal(a[:, 0], b[:, 0])
    assert (a == b).float().mean() >= 0.75


def test_mistakes_raise_one_line_errors(m):
    t = text(2)
    with pytest.raises(ValueError, match="text must be"):
        sample_codes(m, t[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        sample_codes(m, t, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_codes(m, t, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_codes(m, t, top_p=1.5)
    with pytest.raises(ValueError, match="generators"):
        sample_codes(m, t, generators=gens([1]))
    with pytest.raises(ValueError, match="init_codes"):
        sample_codes(m, t, keep=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="null_text"):
        sample_codes(m, t, cond_scale=3.0)


def test_sampling_options_check_and_draw():
    SamplingOptions().check()
    for bad, match in [
        (SamplingOptions(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (SamplingOptions(top_k=0), "top_k must be >= 1, got 0"),
        (SamplingOptions(top_p=0.0), r"top_p must lie in \(0, 1\], got 0.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad.check()
    assert not SamplingOptions().guided and SamplingOptions(cond_scale=2.0).guided
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert next_code(logits, SamplingOptions(temperature=0), None).tolist() == [1, 0]
    # guidance mixes the unconditional second half in: 0 + 3 * (cond - 0) = 3 * cond
    doubled = torch.cat([logits, torch.zeros(2, 3)])
    guided = SamplingOptions(temperature=0, cond_scale=3.0)
    assert next_code(doubled, guided, None).tolist() == [1, 0]
    mixed = torch.cat([torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])])
    # cond favours code 0, uncond code 1: s = 0.25 keeps uncond's choice, s = 3 flips it
    assert next_code(mixed, SamplingOptions(temperature=0, cond_scale=0.25), None).tolist() == [1]
    assert next_code(mixed, SamplingOptions(temperature=0, cond_scale=3.0), None).tolist() == [0]


def test_a_cloned_cache_branches_without_touching_the_original():
    model = make("dalle")
    t, codes = text(2), torch.randint(0, 24, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.prefill(t)
        for i in range(5):
            _, cache = model.step(codes[:, i], i, cache)
        branch = cache.clone()
        other, _ = model.step((codes[:, 5] + 1) % 24, 5, branch)  # a different 6th code
        logits, _ = model.step(codes[:, 5], 5, cache)
        _, full = model(t, codes)
    assert (logits - full[:, 6]).abs().max() <= 1e-4
    assert not torch.allclose(other, logits)
    with pytest.raises(ValueError, match="cache holds"):
        model.step(codes[:, 0], 15, Cache([None] * 3, [None] * 3, length=21, capacity=21))


def test_top_k_draw_among_the_kept_codes_has_the_filtered_distribution():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0, -2.0, 0.0, 1.5])
    kept = filter_logits(logits, top_k=4)
    expected = kept.softmax(-1)  # zero outside the four largest
    rows = 20000
    batched = draw(logits.expand(rows, -1), 4, None, torch.Generator().manual_seed(0))
    per_row = draw(
        logits.expand(rows, -1), 4, None, [torch.Generator().manual_seed(i) for i in range(rows)]
    )
    for codes in (batched, per_row):
        freq = torch.bincount(codes, minlength=8).float() / rows
        assert set(codes.unique().tolist()) == {0, 3, 4, 7}
        assert (freq - expected).abs().max() < 0.015


def test_top_k_draw_keeps_codes_tied_with_the_kth_logit():
    # the third-largest logit (1.0) is shared by three codes: filter_logits keeps all five
    logits = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 0.0])
    codes = draw(logits.expand(4000, -1), 3, None, torch.Generator().manual_seed(1))
    assert set(codes.unique().tolist()) == {0, 1, 2, 3, 4}
