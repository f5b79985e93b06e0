"""Fuzzing the loaders: only the documented error type, with a message, may escape."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dalle1.config import Config, ConfigError, config_from_dict, load_config
from dalle1.data.captions import decode_caption_bytes, read_caption_file
from dalle1.images import BadImageError, load_image

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TMP = Path(tempfile.mkdtemp(prefix="dalle1-fuzz-"))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
# random bytes, and real PNG bytes with random damage (cut, overwritten, appended)
image_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n: PNG[:n], st.integers(0, len(PNG))),
    st.builds(
        lambda i, b: PNG[:i] + b + PNG[i + len(b) :],
        st.integers(0, len(PNG)),
        st.binary(min_size=1, max_size=8),
    ),
    st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary(max_size=200)),
)


@FAST
@given(data=image_bytes, suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp"]))
def test_random_bytes_as_images(data, suffix):
    path = TMP / f"img{suffix}"
    path.write_bytes(data)
    try:
        image = load_image(path, 8)
    except BadImageError as err:
        assert str(err).startswith(f"{path}: ") and len(str(err)) > len(str(path)) + 2
        return
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1


@FAST
@given(data=st.binary(max_size=400))
def test_random_bytes_as_captions(data):
    text, notes = decode_caption_bytes(data)
    assert isinstance(text, str) and all(isinstance(n, str) for n in notes)
    path = TMP / "cap.txt"
    path.write_bytes(data)
    lines, _ = read_caption_file(path)
    assert all(line and line == line.strip() and "\n" not in line for line in lines)


@FAST
@given(text=st.text(max_size=200))
def test_random_strings_as_captions(text):
    path = TMP / "cap2.txt"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    lines, notes = read_caption_file(path)
    assert all(line and "\n" not in line and "\r" not in line for line in lines)


def _load_yaml(text: str):
    path = TMP / "cfg.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return load_config(path)


@FAST
@given(text=st.text(max_size=200))
def test_random_text_as_yaml_config(text):
    try:
        assert isinstance(_load_yaml(text), Config)
    except ConfigError as err:
        assert str(err).strip()


SECTIONS = ["data", "text", "vae", "dalle", "clip", "train"]
KEYS = ["path", "image_size", "lr", "max_steps", "quantizer", "fsq_levels", "devices", "nan_policy"]
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
sections = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values, max_size=4)
configs = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=6), sections | values, max_size=4
)


@FAST
@given(values=configs)
def test_random_structures_as_config(values):
    try:
        assert isinstance(config_from_dict(values), Config)
    except ConfigError as err:
        assert str(err).strip()


@FAST
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_random_overrides(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as err:
        assert str(err).strip()
