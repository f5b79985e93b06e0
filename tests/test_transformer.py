import pytest
import torch

from dalle1.config import DALLEConfig
from dalle1.transformer import DALLE, StreamShape

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


def test_plain_attention_switch_gives_the_flash_kernels_loss_and_gradients():
    from dalle1.training.systems import set_flash_attention

    text, codes = batch()
    m = model("dense").train()

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
