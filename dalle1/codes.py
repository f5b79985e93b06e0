"""Pre-tokenised images: run the frozen VAE once, store the codes, train the transformer on them.

DALL-E's transformer (paper section 2.2) only ever sees the dVAE's codes of an
image, never its pixels, and the tokenizer is frozen during that stage; so the
codes can be computed once. ``dalle1 data encode`` writes a codes folder:

    codes/
      codes.npy        (N, grid²) integer codes in raster order (int16 when the
                       codebook fits, else int32), opened as a memory map
      captions.jsonl   one JSON list of caption lines per row, same order
      meta.json        count, grid, codebook size, image size, the VAE folder
                       and the SHA-256 of its weights, the source data

Rows follow the dataset's fixed order (``load_pairs`` for folders and manifests,
file order for shards), so the train / held-out split of the rows is the same
``split_pairs`` split as that of the images. Training with ``data.codes`` set
checks that the codes came from the VAE named by ``dalle.vae``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .checkpoint import component_folder, load_vae
from .config import DataConfig
from .data import data_format, iter_items, load_pairs
from .data.captions import pick_caption
from .files import atomic_write, read_text, regular_file
from .vae import DiscreteVAE

CODES_FILE, CAPTIONS_FILE, META_FILE = "codes.npy", "captions.jsonl", "meta.json"


def weights_digest(vae_folder: str | Path) -> str:
    """SHA-256 of a VAE's ``model.safetensors`` (the model folder or its ``vae/`` part)."""
    sub = component_folder(vae_folder, "vae")
    digest = hashlib.sha256()
    with open(sub / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def encode_items(
    vae: DiscreteVAE,
    items: Iterable[tuple[torch.Tensor, list[str]]],
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> tuple[torch.Tensor, list[list[str]]]:
    """(image, caption lines) items -> codes (N, grid²) from the VAE's argmax, and the captions."""
    vae.eval()
    codes, captions, batch = [], [], []
    bar = tqdm(items, desc="encoding images", total=total, disable=not progress)
    for image, lines in bar:
        batch.append(image)
        captions.append(list(lines))
        if len(batch) == batch_size:
            codes.append(vae.encode(torch.stack(batch)))
            batch = []
    if batch:
        codes.append(vae.encode(torch.stack(batch)))
    if not codes:
        raise ValueError("no images to encode")
    return torch.cat(codes), captions


def save_codes(out: str | Path, codes: torch.Tensor, captions: list[list[str]], meta: dict) -> Path:
    """Write a codes folder (see the module docstring); files appear complete or not at all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(meta["codebook_size"])
    dtype = np.int16 if vocab <= np.iinfo(np.int16).max else np.int32
    array = codes.cpu().numpy().astype(dtype)
    atomic_write(out / CODES_FILE, lambda fh: np.save(fh, array))
    lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions)
    atomic_write(out / CAPTIONS_FILE, lambda fh: fh.write(lines.encode("utf-8")))
    meta = {
        **meta,
        "count": len(codes),
        "grid_tokens": int(codes.shape[1]),
        "dtype": dtype.__name__,
    }
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(out / META_FILE, lambda fh: fh.write(text.encode("utf-8")))  # last: marks complete
    return out


class CodesFile:
    """A codes folder, with ``codes`` memory-mapped (rows are read when used)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        for name in (CODES_FILE, CAPTIONS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"codes folder '{folder}' has no {name} (write it with `dalle1 data encode`)"
                )
        self.folder = folder
        try:  # regular files only (a pipe would block), JSON parsed as data
            self.meta = json.loads(read_text(folder / META_FILE, "config"))
            self.codes = np.load(regular_file(folder / CODES_FILE, "codes"), mmap_mode="r")
            text = read_text(folder / CAPTIONS_FILE, "manifest")
            self.captions = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError) as err:  # UnsafeFileError, bad JSON, bad .npy
            raise ValueError(f"codes folder '{folder}' is damaged: {err}") from None
        if not isinstance(self.meta, dict) or self.codes.ndim != 2:
            raise ValueError(
                f"codes folder '{folder}' is damaged: not written by `dalle1 data encode`"
            )
        if len(self.captions) != len(self.codes):
            raise ValueError(
                f"codes folder '{folder}': {len(self.codes)} code rows but {len(self.captions)} caption rows"
            )

    def __len__(self) -> int:
        return len(self.codes)

    def check_vae(self, vae: DiscreteVAE, vae_folder: str | Path) -> None:
        """Raise ValueError if these codes were not made by this VAE (numbers, then weights)."""
        m = self.meta
        if m["codebook_size"] != vae.codebook_size or m["grid_tokens"] != vae.grid_size**2:
            raise ValueError(
                f"codes in '{self.folder}' have {m['grid_tokens']} tokens from a codebook of "
                f"{m['codebook_size']}, but the VAE in '{vae_folder}' makes {vae.grid_size**2} "
                f"from {vae.codebook_size}"
            )
        if m.get("vae_sha256") and m["vae_sha256"] != weights_digest(vae_folder):
            raise ValueError(
                f"codes in '{self.folder}' were made by another VAE ('{m.get('vae')}'), not by "
                f"'{vae_folder}': run `dalle1 data encode` again"
            )

    def tensor(self, rows: list[int] | None = None) -> torch.Tensor:
        """Codes of ``rows`` (all by default) as a LongTensor (loaded into memory)."""
        array = self.codes if rows is None else self.codes[np.asarray(rows, dtype=np.int64)]
        return torch.from_numpy(np.asarray(array, dtype=np.int64))


class CodesDataset(Dataset):
    """(codes, caption) rows of a codes folder; the caption line is re-drawn every time
    (seeded per draw by the resumable sampler, like
    :class:`dalle1.training.datamodule.EncodedCaptions`)."""

    def __init__(self, store: CodesFile, rows: list[int] | None = None):
        self.store = store
        self.rows = list(range(len(store))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        row = self.rows[i]
        codes = torch.from_numpy(np.asarray(self.store.codes[row], dtype=np.int64))
        return codes, pick_caption(self.store.captions[row], i)  # i may carry the draw's seed


def encode_data(
    vae_folder: str | Path,
    data_cfg: DataConfig,
    out: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """``dalle1 data encode``: every image of ``data_cfg`` (any format) -> a codes folder."""
    vae = load_vae(vae_folder)
    fmt = data_format(data_cfg)
    pairs = None if fmt == "webdataset" else load_pairs(data_cfg)
    items = iter_items(data_cfg, vae.cfg.image_size, pairs)
    codes, captions = encode_items(
        vae, items, batch_size, progress, total=None if pairs is None else len(pairs)
    )
    meta = {
        "vae": str(vae_folder),
        "vae_sha256": weights_digest(vae_folder),
        "codebook_size": vae.codebook_size,
        "grid_size": vae.grid_size,
        "image_size": vae.cfg.image_size,
        "source": str(data_cfg.path),
        "format": fmt,
    }
    return save_codes(out, codes, captions, meta)
