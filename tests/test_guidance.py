"""Classifier-free guidance: two streams that stay apart, mixed in float32, inputs untouched."""

import pytest
import torch

from dalle1.config import DALLEConfig
from dalle1.sampling import draw, sample_codes
from dalle1.transformer import DALLE, StreamShape

SHAPE = StreamShape(text_vocab=40, text_len=5, image_vocab=24, grid=3, bos_id=1)
NULL = torch.arange(35, 40)  # per-position pads: the empty caption


@pytest.fixture(scope="module", params=["dense", "dalle"])
def m(request):
    torch.manual_seed(0)
    cfg = DALLEConfig(dim=32, depth=3, heads=2, dim_head=16, attention=request.param, conv_kernel=3)
    return DALLE(cfg, SHAPE).eval()


def text(b=3):
    return torch.randint(2, 35, (b, 5), generator=torch.Generator().manual_seed(2))


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def reference(model, t, scale, seeds, top_k=None):
    """Guidance the slow, obvious way: two separate caches, one per stream."""
    null = NULL.expand_as(t)
    generators = gens(seeds)
    codes = torch.zeros(len(t), SHAPE.num_codes, dtype=torch.long)
    with torch.no_grad():
        cond, cond_cache = model.prefill(t)
        uncond, uncond_cache = model.prefill(null)
        for i in range(SHAPE.num_codes):
            mixed = uncond.float() + scale * (cond.float() - uncond.float())
            codes[:, i] = draw(mixed, top_k, None, generators)
            if i < SHAPE.num_codes - 1:
                cond, cond_cache = model.step(codes[:, i], i, cond_cache)
                uncond, uncond_cache = model.step(codes[:, i], i, uncond_cache)
    return codes


def test_scale_one_is_plain_sampling(m):
    t = text()
    plain = sample_codes(m, t, generators=gens([1, 2, 3]))
    guided = sample_codes(m, t, cond_scale=1.0, null_text=NULL, generators=gens([1, 2, 3]))
    assert torch.equal(plain, guided)


def test_scale_zero_is_sampling_the_empty_caption(m):
    # uncond + 0 · (cond − uncond) = uncond exactly: the doubled batch's second half must
    # behave like the empty caption alone, so the two streams do not share a cache.
    t = text()
    guided = sample_codes(m, t, cond_scale=0.0, null_text=NULL, generators=gens([4, 5, 6]))
    empty = sample_codes(m, NULL.expand_as(t), generators=gens([4, 5, 6]))
    assert torch.equal(guided, empty)


@pytest.mark.parametrize("scale", [3.0, -1.0])
def test_doubled_batch_equals_two_separate_caches(m, scale):
    t = text()
    got = sample_codes(m, t, cond_scale=scale, null_text=NULL, top_k=12, generators=gens([7, 8, 9]))
    assert torch.equal(got, reference(m, t, scale, [7, 8, 9], top_k=12))


def test_guidance_changes_the_samples_and_cache_matches_recompute(m):
    t = text()
    plain = sample_codes(m, t, temperature=0)
    guided = sample_codes(m, t, temperature=0, cond_scale=4.0, null_text=NULL)
    recomputed = sample_codes(m, t, temperature=0, cond_scale=4.0, null_text=NULL, use_cache=False)
    assert not torch.equal(plain, guided)
    assert torch.equal(guided, recomputed)


def test_callers_tensors_are_unchanged(m):
    t, null = text(), NULL.clone()
    init = torch.randint(0, 24, (3, 9))
    keep = torch.zeros(3, 9, dtype=torch.bool)
    keep[:, :2] = True
    copies = [x.clone() for x in (t, null, init, keep)]
    out = sample_codes(
        m, t, cond_scale=3.0, null_text=null, init_codes=init, keep=keep, generators=gens([0, 1, 2])
    )
    for before, after in zip(copies, (t, null, init, keep)):
        assert torch.equal(before, after)
    assert torch.equal(out[:, :2], init[:, :2])
    # and the prompt still matters after the first code (it was not erased mid-sampling)
    again = sample_codes(m, t, cond_scale=3.0, null_text=null, generators=gens([0, 1, 2]))
    other = sample_codes(m, t.flip(0), cond_scale=3.0, null_text=null, generators=gens([0, 1, 2]))
    assert not torch.equal(again[:, 1:], other[:, 1:])


def test_batched_prompts_match_prompts_alone_under_guidance(m):
    t = text(3)
    together = sample_codes(m, t, cond_scale=2.5, null_text=NULL, generators=gens([3, 4, 5]))
    for i, seed in enumerate([3, 4, 5]):
        alone = sample_codes(
            m, t[i : i + 1], cond_scale=2.5, null_text=NULL, generators=gens([seed])
        )
        assert torch.equal(together[i : i + 1], alone)


def test_null_text_may_be_a_row_or_a_batch(m):
    t = text(2)
    a = sample_codes(m, t, temperature=0, cond_scale=3.0, null_text=NULL)
    b = sample_codes(m, t, temperature=0, cond_scale=3.0, null_text=NULL[None])
    c = sample_codes(m, t, temperature=0, cond_scale=3.0, null_text=NULL.expand(2, -1))
    assert torch.equal(a, b) and torch.equal(a, c)
