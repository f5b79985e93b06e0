import pytest
import torch

from dalle1.config import DALLEConfig
from dalle1.sampling import filter_logits, sample_codes
from dalle1.transformer import DALLE, StreamShape

SHAPE = StreamShape(text_vocab=40, text_len=5, image_vocab=24, grid=3, bos_id=1)


@pytest.fixture(params=["dense", "dalle"])
def m(request):
    torch.manual_seed(0)
    return DALLE(
        DALLEConfig(dim=32, depth=3, heads=2, dim_head=16, attention=request.param, conv_kernel=3),
        SHAPE,
    ).eval()


def text(b=3):
    return torch.randint(2, 35, (b, 5), generator=torch.Generator().manual_seed(2))


def test_greedy_cached_equals_uncached(m):
    t = text()
    cached = sample_codes(m, t, temperature=0)
    uncached = sample_codes(m, t, temperature=0, use_cache=False)
    assert cached.shape == (3, 9) and torch.equal(cached, uncached)


def test_seeded_sampling_is_reproducible_and_cache_independent(m):
    t = text()
    a = sample_codes(m, t, generators=torch.Generator().manual_seed(5))
    b = sample_codes(m, t, generators=torch.Generator().manual_seed(5))
    c = sample_codes(m, t, generators=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 24


def test_filters_act_on_image_logits_only():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # probabilities ~ .09 .67 .24 .03: top_p 0.7 keeps the two tokens that reach 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]


def test_keep_mask_forces_codes(m):
    t = text(2)
    init = torch.randint(0, 24, (2, 9))
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[:, :4] = True
    out = sample_codes(
        m, t, init_codes=init, keep=keep, generators=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[:, :4], init[:, :4])
