"""Training data: captioned images from a folder, a manifest or WebDataset shards.

Every format yields (image (3, H, W) in [0, 1], caption); a sample has caption
*lines* and one is drawn at random each time it is used. Files that cannot be
used are skipped and counted, never fatal. The modules, in import order:

* ``problems`` — the record of skipped and converted files;
* ``captions`` — caption files -> lines, and the draw of one line;
* ``folder`` — ``photo.png`` + ``photo.txt`` pairs (:class:`CaptionedFolder`);
* ``manifest`` — JSONL / CSV manifests (``file_name``, ``text``);
* ``shards`` — WebDataset tar shards, streamed (:class:`ShardDataset`);
* ``sources`` — which of these ``data.format`` means, and every item once;
* ``check`` — ``dalle1 data check``;
* ``shapes``, ``emoji`` — the built-in shapes set and the Noto emoji set.

Pixels (decoding, conversion rules, resizing) are :mod:`dalle1.images`'; this
package imports nothing of dalle1 but the ground floor (files, config, images).
"""

from .folder import CaptionedFolder, find_pairs, split_pairs
from .shapes import make_shapes_dataset
from .shards import ShardDataset
from .sources import data_format, iter_items, load_pairs

__all__ = [
    "CaptionedFolder",
    "ShardDataset",
    "data_format",
    "find_pairs",
    "iter_items",
    "load_pairs",
    "make_shapes_dataset",
    "split_pairs",
]
