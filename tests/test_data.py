import torch

from dalle1.data import CaptionedFolder, find_pairs, make_shapes_dataset, split_pairs


def test_shapes_dataset_is_deterministic(tmp_path):
    a = make_shapes_dataset(
        tmp_path / "a", count=6, image_size=16, seed=3, max_shapes=2, progress=False
    )
    b = make_shapes_dataset(
        tmp_path / "b", count=6, image_size=16, seed=3, max_shapes=2, progress=False
    )
    for (ia, ca), (ib, cb) in zip(find_pairs(a), find_pairs(b)):
        assert ia.read_bytes() == ib.read_bytes() and ca.read_text() == cb.read_text()


def test_captions_describe_the_image(tmp_path):
    folder = make_shapes_dataset(tmp_path, count=20, image_size=32, seed=0, progress=False)
    ds = CaptionedFolder(folder, 32)
    assert len(ds) == 20
    for i in range(len(ds)):
        image, caption = ds[i]
        assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
        assert caption in ds.captions[i]
        # the named colour dominates the non-background pixels
        colour = {"red": 0, "green": 1, "blue": 2}
        first = ds.captions[i][-1].split()  # "a <colour> <shape>"
        if first[1] in colour:
            fg = image.reshape(3, -1)[:, (image.reshape(3, -1) - 40 / 255).abs().sum(0) > 0.3]
            assert fg.mean(1).argmax() == colour[first[1]]


def test_split_is_deterministic_and_disjoint(tmp_path):
    pairs = list(range(100))
    train, val = split_pairs(pairs, 0.1, seed=1)
    assert (
        len(val) == 10
        and not set(train) & set(val)
        and split_pairs(pairs, 0.1, seed=1) == (train, val)
    )
    assert torch.is_tensor(torch.tensor(train))
