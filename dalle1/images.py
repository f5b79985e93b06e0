"""Pixels: how any image file becomes a model-sized tensor, and tensors become pictures.

Images are float tensors (3, H, W) in [0, 1] everywhere outside the VAE; PIL
images appear only at the edges (files in, PNGs out). Every reader of every
data format, the editing code and the apps go through the same two steps:
:func:`to_rgb` (the conversion rules below) and :func:`pil_to_tensor` (resize
the shorter side to the model size, crop the centre square; :func:`fit_geometry`
gives that arithmetic to the editing code too).

Conversion rules (:func:`to_rgb`; ``docs/reliability.md`` lists them for users)
    - grayscale (``1``, ``L``), palette (``P``), CMYK, YCbCr … → RGB;
    - with an alpha channel (``RGBA``, ``LA``, ``PA``, palette with a
      transparent colour) → alpha-composited onto a white background;
    - 16-bit (``I;16*``, and ``I`` whose values exceed 255) → scaled by
      1/65535, so the full range maps to [0, 1] instead of being clipped;
    - 32-bit float (``F``) → taken as [0, 1] if its maximum is ≤ 1, else as
      [0, 255]; NaN/Inf become 0 / the range ends;
    - an EXIF orientation tag is applied (photos come out upright);
    - an image smaller than the model size is upscaled (bicubic) along its
      shorter side and centre-cropped, like every other image;
    - animated images: the first frame.

A file that cannot be decoded (Pillow cannot identify it, it is truncated or
corrupt, over Pillow's decompression-bomb limit, or gone) raises
:class:`BadImageError`, which names the file and the reason; the data readers
skip and count such files (:mod:`dalle1.data`). Files are opened through
:func:`dalle1.files.open_regular`: a named pipe, a device or a directory is
refused before Pillow reads a byte. An image a user hands in to be edited
(:func:`load_input`) is decoded fully up front and may have at most
:data:`MAX_INPUT_PIXELS` pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .files import UnsafeFileError, open_regular

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

#: an image given by the caller: a PIL image or the path of a file
ImageInput = Image.Image | str | Path

#: the most pixels of an image handed in to be edited (CLI --image / --mask, the web UI): 8192²
MAX_INPUT_PIXELS = 8192 * 8192


class BadImageError(ValueError):
    """An image cannot be used: ``.path`` names the file (None: no single file), ``.reason`` why."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(reason if path is None else f"{path}: {reason}")

    def __reduce__(self):  # picklable (DataLoader workers) although __init__ takes two arguments
        return (type(self), (self.path, self.reason))


# --- conversion rules ----------------------------------------------------------------------

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def conversion_of(img: Image.Image, image_size: int | None = None) -> list[str]:
    """The conversion rules :func:`to_rgb` / resizing will apply to ``img`` (for reports)."""
    rules = []
    mode = img.mode
    if mode in SIXTEEN_BIT or mode == "I":
        rules.append("16-bit image scaled to 8 bits")
    elif mode == "F":
        rules.append("float image scaled to 8 bits")
    elif mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rules.append("transparency composited on white")
    elif mode == "P":
        rules.append("palette image converted to RGB")
    elif mode in ("1", "L"):
        rules.append("grayscale image converted to RGB")
    elif mode != "RGB":
        rules.append(f"{mode} image converted to RGB")
    if image_size is not None and min(img.size) < image_size:
        rules.append(f"smaller than {image_size}px: upscaled")
    return rules


def _from_gray_array(array: np.ndarray) -> Image.Image:
    gray = (np.clip(np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0), 0, 1) * 255).round()
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow image -> 8-bit RGB by the rules in this module's docstring."""
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in SIXTEEN_BIT or mode == "I":
        array = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if mode in SIXTEEN_BIT or array.max(initial=0) > 255 else 255.0
        return _from_gray_array(array / scale)
    if mode == "F":
        array = np.asarray(img, dtype=np.float64)
        finite = array[np.isfinite(array)]
        scale = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        return _from_gray_array(array / scale)
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img


def describe_error(err: BaseException) -> str:
    """A short reason for a decoding failure ('truncated file', 'not an image' …)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, UnsafeFileError):
        return err.reason
    if isinstance(err, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(err, Image.UnidentifiedImageError) or "cannot identify image" in text:
        return "not an image Pillow can read"
    if "truncated" in text:
        return "truncated file"
    if isinstance(err, Image.DecompressionBombError):
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        if len(numbers) >= 2:
            return (
                f"too many pixels ({numbers[0]:,}; Pillow's limit against decompression bombs "
                f"is {numbers[1]:,})"
            )
        return f"too many pixels ({text})"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    return f"corrupt image ({type(err).__name__}: {text.splitlines()[0][:120]})"


@contextmanager
def _open(path) -> Iterator[Image.Image]:
    """``Image.open`` on a checked regular file (never a pipe or a device); file objects as given."""
    if isinstance(path, str | Path):
        with open_regular(path, "image") as fh, Image.open(fh) as img:
            yield img
    else:
        with Image.open(path) as img:
            yield img


def probe_image(path: str | Path, image_size: int | None = None, decode: bool = False) -> list[str]:
    """Open an image (header only, or fully with ``decode``); -> its conversion rules.

    Raises :class:`BadImageError` (naming the file and the reason) if it cannot be read.
    """
    try:
        with _open(path) as img:
            rules = conversion_of(img, image_size)
            if decode:
                img.load()
                to_rgb(img)
    except Exception as err:  # noqa: BLE001 - any decoder failure means: skip this file
        raise BadImageError(path, describe_error(err)) from None
    return rules


# --- image <-> tensor ----------------------------------------------------------------------


def fit_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """How an image lands on the model's ``size`` square: resize so the shorter side is
    ``size``, then crop the centre. -> (resized width, resized height, crop left, crop top)."""
    if min(width, height) != size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
    return width, height, (width - size) // 2, (height - size) // 2


def pil_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) in [0, 1]; smaller images are upscaled (bicubic)."""
    img = to_rgb(img)
    resized_w, resized_h, left, top = fit_geometry(*img.size, image_size)
    if (resized_w, resized_h) != img.size:
        img = img.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    img = img.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """An image file -> float tensor (3, size, size) in [0, 1]: RGB, shorter side resized, centre crop.

    Grayscale / alpha / palette / 16-bit images are converted by the rules of this
    module; a file that cannot be decoded (not an image, truncated, corrupt) raises
    :class:`BadImageError` naming it. ``path`` may also be a file object with a ``name``.
    """
    try:
        with _open(path) as img:
            img.load()
            return pil_to_tensor(img, image_size)
    except Exception as err:  # noqa: BLE001 - every decoder failure becomes one error type
        name = path if isinstance(path, str | Path) else getattr(path, "name", repr(path))
        raise BadImageError(name, describe_error(err)) from None


def check_pixels(img: Image.Image, name: object = "image") -> None:
    """BadImageError when ``img`` has more than :data:`MAX_INPUT_PIXELS` pixels."""
    if img.width * img.height > MAX_INPUT_PIXELS:
        raise BadImageError(
            name,
            f"{img.width}x{img.height} is {img.width * img.height / 1e6:.0f} M pixels, over the "
            f"limit of {MAX_INPUT_PIXELS / 1e6:.0f} M for an image to edit",
        )


def open_input(path: str | Path, what: str = "image") -> Image.Image:
    """A user's image file, fully decoded (a copy; the file is closed), upright (EXIF applied).

    Refused with one line naming the file: missing (FileNotFoundError), a directory, a pipe,
    not an image, truncated or corrupt, over :data:`MAX_INPUT_PIXELS` (BadImageError).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    try:
        with _open(path) as img:
            check_pixels(img, path)  # from the header, before decoding a byte of pixels
            img.load()
            upright = ImageOps.exif_transpose(img)
            return upright.copy() if upright is img else upright
    except BadImageError:
        raise
    except Exception as err:  # noqa: BLE001 - every decoder failure becomes one error type
        raise BadImageError(path, describe_error(err)) from None


def load_input(image: ImageInput) -> Image.Image:
    """A caller's image (PIL image or path) -> an upright RGB PIL image, by the conversion
    rules of this module (:func:`to_rgb`); one-line errors otherwise (see :func:`open_input`)."""
    if isinstance(image, str | Path):
        return to_rgb(open_input(image))
    if isinstance(image, Image.Image):
        check_pixels(image)
        return to_rgb(image)
    raise ValueError(f"image must be a PIL image or a path, got {type(image).__name__}")


def stack_images(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) in [0, 1], each through :func:`pil_to_tensor`."""
    return torch.stack([pil_to_tensor(im, image_size) for im in images])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Tensors in [0, 1] -> the 8-bit values a PNG of them holds (clamped, rounded), same shape."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image."""
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())


# --- grids ---------------------------------------------------------------------------------


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(B, 3, H, W) -> one (3, H', W') image with ``nrow`` images per row (white padding)."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i, image in enumerate(images):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = image.detach().float().cpu()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write a grid of images in [0, 1] as a PNG (nearest-neighbour upscaled by ``scale``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = tensor_to_pil(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)
    return path
