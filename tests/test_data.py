"""Built-in data, tasks, and the adapters for users' data, on files in the real formats."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import datasets

from robust_transfer.core.errors import DataError
from robust_transfer.data import (
    LATENT_NAMES,
    SHAPES,
    get_task,
    load_array_file,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_sklearn_digits,
    load_torchvision,
    render_dsprites,
    stratified_split,
    task_names,
)
from robust_transfer.data.sources import load_split


def test_builtin_digits() -> None:
    mnist = load_mnist()
    assert mnist.x.shape == (5000, 1, 28, 28)
    assert mnist.x.dtype == torch.float32
    assert float(mnist.x.min()) >= 0.0
    assert float(mnist.x.max()) <= 1.0
    assert torch.equal(torch.bincount(mnist.y), torch.full((10,), 500))
    digits = load_sklearn_digits()
    assert digits.x.shape == (1797, 1, 28, 28)
    assert float(digits.x.max()) <= 1.0


def test_dsprites_is_seeded_balanced_and_latent_driven() -> None:
    a, b = render_dsprites(90, seed=3, size=32), render_dsprites(90, seed=3, size=32)
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, render_dsprites(90, seed=4, size=32).x)
    assert a.classes == SHAPES
    assert a.target_names == LATENT_NAMES
    assert torch.equal(torch.bincount(a.y), torch.full((3,), 30))
    assert a.targets is not None
    assert float(a.targets.min()) >= 0
    assert float(a.targets.max()) <= 1
    # Bigger scale latent, more white pixels (within each shape).
    area = a.x.flatten(1).sum(1)
    for shape in range(3):
        chosen = a.y == shape
        scale = a.targets[chosen, 0]
        assert np.corrcoef(scale.numpy(), area[chosen].numpy())[0, 1] > 0.8


def test_tasks_hold_out_a_disjoint_test_part() -> None:
    assert {"mnist-5-9", "digits8x8-5-9", "dsprites-shape", "dsprites-latents"} <= set(task_names())
    task = get_task("mnist-5-9")
    assert task.pretrain is not None
    assert set(task.pretrain.train.y.tolist()) == set(range(5))
    assert task.downstream.train.classes == ("5", "6", "7", "8", "9")
    train = {tuple(row) for row in task.downstream.train.x.flatten(1)[:, ::7].tolist()}
    test = {tuple(row) for row in task.downstream.test.x.flatten(1)[:, ::7].tolist()}
    assert not train & test
    assert len(task.downstream.test) == 500  # 20% of the 2500 digits 5-9
    again = get_task("mnist-5-9")
    assert torch.equal(again.downstream.test.x, task.downstream.test.x)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")


def test_stratified_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(load_sklearn_digits(), test_fraction=1.5)


def test_fashion_mnist_from_raw_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9, 9], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, 6, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, 6) + labels.tobytes()
        )
    data = load_torchvision("fashion-mnist", tmp_path, train=True, size=16, limit=5)
    assert data.x.shape == (5, 1, 16, 16)
    assert data.classes[0] == "T-shirt/top"
    assert data.y.tolist() == [0, 1, 2, 3, 9]
    full = load_torchvision("fashion-mnist", tmp_path, train=False)
    torch.testing.assert_close(full.x[:, 0], torch.from_numpy(images).float() / 255)
    # The same through data specs: the part named in the spec, options as keywords.
    spec = load_dataset("torchvision:fashion-mnist:train", root=tmp_path, size=16, limit=5)
    torch.testing.assert_close(spec.x, data.x)
    assert load_dataset("torchvision:fashion-mnist", root=tmp_path).name == "fashion-mnist/test"
    with pytest.raises(DataError, match="must be train or test"):
        load_dataset("torchvision:fashion-mnist:validation", root=tmp_path)
    with pytest.raises(DataError, match=r"takes no option \['colour'\]"):
        load_dataset("torchvision:fashion-mnist", root=tmp_path, colour=True)
    with pytest.raises(DataError, match=r"takes no option \['root'\] \(it takes: none\)"):
        load_dataset("mnist", root=tmp_path)


def test_cifar10_from_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{k}" for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    # torchvision checks the official files' MD5 sums, which hand-made files cannot match.
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)
    data = load_torchvision("cifar10", tmp_path, train=True)
    assert data.x.shape == (10, 3, 32, 32)
    assert data.classes[3] == "class3"
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())["data"][0], np.uint8)
    torch.testing.assert_close(data.x[0], torch.from_numpy(first.reshape(3, 32, 32)).float() / 255)


def test_svhn_from_mat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(2).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy.io.savemat(
        tmp_path / "test_32x32.mat", {"X": images, "y": np.array([[10], [1], [2], [3]])}
    )
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    data = load_torchvision("svhn", tmp_path, train=False)
    assert data.x.shape == (4, 3, 32, 32)
    assert data.y.tolist() == [0, 1, 2, 3]  # SVHN's label 10 is the digit 0


def test_missing_torchvision_data_says_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_torchvision("cifar10", tmp_path, train=True)
    with pytest.raises(ValueError, match="unknown torchvision data set 'imagenet'"):
        load_torchvision("imagenet", tmp_path, train=True)


def test_image_folder(tmp_path: Path) -> None:
    for name, colour in (("forest", (0, 200, 0)), ("sea", (0, 0, 200))):
        (tmp_path / name).mkdir()
        for k in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / name / f"{k}.png")
    (tmp_path / "sea" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, size=16, limit_per_class=2)
    assert data.classes == ("forest", "sea")
    assert data.x.shape == (4, 3, 16, 16)
    assert data.y.tolist() == [0, 0, 1, 1]
    assert float(data.x[0, 1].mean()) == pytest.approx(200 / 255, abs=1e-3)
    grey = load_dataset(f"folder:{tmp_path}", size=8, grayscale=True)
    assert grey.x.shape == (6, 1, 8, 8)
    (tmp_path / "forest" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_folder(tmp_path, size=8)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "none", size=8)


def test_train_and_test_folders_make_one_split(tmp_path: Path) -> None:
    """Intel Image Classification's layout: seg_train/<class>, seg_test/<class>."""
    for part, count in (("seg_train", 4), ("seg_test", 6)):
        for name, colour in (("forest", (0, 200, 0)), ("sea", (0, 0, 200))):
            (tmp_path / part / name).mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (12, 12), colour).save(tmp_path / part / name / f"{k}.png")
    split = load_split(
        f"folder:{tmp_path / 'seg_train'}", f"folder:{tmp_path / 'seg_test'}", size=8
    )
    assert (len(split.train), len(split.test)) == (8, 12)
    # Folders come sorted by class; the held-out order must not be.
    assert sorted(split.test.y[:2].tolist()) == [0, 1]
    assert sorted(split.test.y.tolist()) == [0] * 6 + [1] * 6
    whole = load_split(f"folder:{tmp_path / 'seg_test'}", size=8)
    assert (len(whole.train), len(whole.test)) == (10, 2)
    (tmp_path / "seg_test" / "desert").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "seg_test" / "desert" / "0.png")
    with pytest.raises(DataError, match="classes differ"):
        load_split(f"folder:{tmp_path / 'seg_train'}", f"folder:{tmp_path / 'seg_test'}", size=8)
    # Each spec gets the options its loader takes: a folder's size, none for a file.
    held_out = tmp_path / "held_out.npz"
    np.savez(
        held_out,
        x=np.zeros((4, 3, 8, 8), np.float32),
        y=np.array([0, 1, 0, 1]),
        classes=np.array(["forest", "sea"]),
    )
    mixed = load_split(f"folder:{tmp_path / 'seg_train'}", str(held_out), size=8)
    assert (len(mixed.train), len(mixed.test)) == (8, 4)
    with pytest.raises(DataError, match=r"data options \['colour'\]"):
        load_split(f"folder:{tmp_path / 'seg_train'}", str(held_out), size=8, colour=1)


def test_array_files(tmp_path: Path) -> None:
    x = np.random.default_rng(3).random((5, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=np.arange(5) % 2, classes=np.array(["a", "b"]))
    data = load_array_file(tmp_path / "mine.npz")
    assert data.classes == ("a", "b")
    assert data.x.shape == (5, 1, 8, 8)
    # Laid out as torch allocates (numpy's buffer starts anywhere; kernels round by it).
    assert data.x.is_contiguous()
    assert data.x.data_ptr() % 64 == 0
    torch.save(
        {
            "x": torch.from_numpy((x * 255).astype(np.uint8)),
            "y": torch.arange(5),
            "targets": torch.rand(5),
        },
        tmp_path / "mine.pt",
    )
    from_pt = load_dataset(str(tmp_path / "mine.pt"))
    assert from_pt.targets is not None
    assert from_pt.targets.shape == (5, 1)
    assert from_pt.num_classes == 5


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"x": np.zeros((2, 1, 4, 4), np.float32)}, "lacks y"),
        ({"x": np.full((2, 1, 4, 4), 2.0, np.float32), "y": np.zeros(2, int)}, r"\[0, 1\]"),
        ({"x": np.full((2, 1, 4, 4), np.nan, np.float32), "y": np.zeros(2, int)}, "NaN"),
        ({"x": np.zeros((2, 4, 4), np.float32), "y": np.zeros(2, int)}, "4-D"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(3, int)}, "to match x"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2)}, "integer class labels"),
    ],
)
def test_bad_array_files(tmp_path: Path, content: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **content)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match=match):
        load_array_file(path)


def test_corrupted_and_unknown_files(tmp_path: Path) -> None:
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_array_file(tmp_path / "broken.npz")
    (tmp_path / "pickled.pt").write_bytes(gzip.compress(pickle.dumps({"x": object()})))
    with pytest.raises(ValueError, match="weights-only"):
        load_array_file(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        load_array_file(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="unknown data spec"):
        load_dataset("imagenet")
    assert len(load_dataset("digits8x8")) == 1797


def test_first_points_of_a_split_cover_every_class() -> None:
    split = get_task("mnist-5-9").downstream
    for part in (split.train, split.test):
        assert set(part.y[:100].tolist()) == set(range(5))


def test_stratified_sample_is_seeded_and_keeps_class_shares() -> None:
    from robust_transfer.core.errors import DataError
    from robust_transfer.data.sources import load_dataset
    from robust_transfer.data.tasks import stratified_sample

    mnist = load_dataset("mnist")  # sorted by class: the first 200 are all zeros
    sample = stratified_sample(mnist, 200, seed=0)
    counts = torch.bincount(sample.y, minlength=10)
    expected = torch.bincount(mnist.y, minlength=10) * 200 / len(mnist)
    assert (counts - expected).abs().max() <= 1.0
    assert torch.equal(sample.y, stratified_sample(mnist, 200, seed=0).y)
    assert not torch.equal(sample.y, stratified_sample(mnist, 200, seed=1).y)
    assert len(stratified_sample(mnist, 10**6)) == len(mnist)
    test = load_dataset("task:mnist-5-9")
    assert test.classes == load_dataset("task:mnist-5-9:train").classes
    with pytest.raises(DataError, match="train or test"):
        load_dataset("task:mnist-5-9:val")
