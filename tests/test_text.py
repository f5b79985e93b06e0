import torch

from dalle1.text import TextTokenizer

CAPTIONS = [
    "a small red circle at the top left",
    "a blue square",
    "a large green triangle on the right",
] * 5


def make(text_len=8, dropout=0.0):
    return TextTokenizer.train(CAPTIONS, vocab_size=300, text_len=text_len, bpe_dropout=dropout)


def test_round_trip_lowercases_and_pads():
    tok = make(text_len=16)
    ids = tok.encode(["A Blue SQUARE", "a small red circle at the top left"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert tok.decode(ids) == ["a blue square", "a small red circle at the top left"]


def test_every_position_has_its_own_pad():
    tok = make(text_len=8)
    ids = tok.encode(["a blue square"])[0]
    n = tok.num_tokens("a blue square")
    assert n < 8
    assert ids[n:].tolist() == [tok.bpe_vocab_size + i for i in range(n, 8)]
    assert torch.equal(tok.encode([""])[0], tok.pad_row())
    assert len(set(tok.pad_row().tolist())) == 8
    assert tok.vocab_size == tok.bpe_vocab_size + 8
    assert not tok.is_pad(ids[:n]).any() and tok.is_pad(ids[n:]).all()


def test_truncates_long_captions():
    tok = make(text_len=4)
    ids = tok.encode(["a large green triangle on the right"])
    assert ids.shape == (1, 4) and not tok.is_pad(ids).any()


def test_bpe_dropout_only_when_asked(tmp_path):
    # Dropout can split a caption down to single characters, so leave room
    # for one token per character: a truncated caption would decode short.
    text_len = max(len(c) for c in CAPTIONS)
    tok = make(text_len=text_len, dropout=0.5)
    plain = tok.encode(CAPTIONS[:3])
    assert torch.equal(plain, tok.encode(CAPTIONS[:3]))
    dropped = [tok.encode(CAPTIONS[:3], dropout=True) for _ in range(5)]
    assert any(not torch.equal(d, plain) for d in dropped)
    assert tok.decode(dropped[0]) == [
        c.lower() for c in CAPTIONS[:3]
    ]  # dropout changes ids, not text
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json", text_len)
    assert torch.equal(again.encode(CAPTIONS), tok.encode(CAPTIONS))
