"""Image data: the digits split, the deterministic sampler, held-out shards, image folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mptk.config.schema import DataConfig, DataSource
from mptk.data import images
from mptk.data.order import Place

# ---------------------------------------------------------------------------------------
# Digits and the held-out split
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return images.digits()


def test_digits_shape_and_range(digits):
    batch = digits.batch([0, 1, 2])
    assert len(digits) == 1797 and digits.classes == tuple(str(c) for c in range(10))
    assert tuple(batch["images"].shape) == (3, 1, 8, 8)
    assert batch["images"].dtype.is_floating_point and batch["labels"].dtype.is_signed
    assert 0.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0


def test_digits_resized_and_rgb():
    batch = images.digits(size=16, channels=3).batch([5])
    assert tuple(batch["images"].shape) == (1, 3, 16, 16)
    assert np.array_equal(batch["images"][0, 0], batch["images"][0, 2])


def test_split_is_deterministic_disjoint_and_complete():
    train, held = images.split(1797, 0.2)
    again_train, again_held = images.split(1797, 0.2)
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert len(held) == 359 and len(train) == 1797 - 359
    assert not set(train) & set(held)
    assert sorted(set(train) | set(held)) == list(range(1797))


def test_split_holds_out_every_class(digits):
    _, held = images.split(len(digits), 0.2)
    counts = np.bincount(digits.labels[held], minlength=10)
    assert counts.min() >= 20, counts  # a random 20%, not e.g. every 5th (digits cycle 0..9)


def test_split_needs_two_images_and_keeps_one_for_training():
    with pytest.raises(ValueError, match="at least 2"):
        images.split(1, 0.5)
    train, held = images.split(3, 0.99)
    assert len(train) == 1 and len(held) == 2


def test_subset_renumbers(digits):
    sub = digits.subset(np.array([10, 20, 30]))
    assert len(sub) == 3
    assert np.array_equal(sub.batch([2])["images"], digits.batch([30])["images"])
    assert int(sub.batch([1])["labels"][0]) == int(digits.labels[20])


# ---------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------


def step_samples(step, mbs, grad_acc, dp, n=100, seed=3):
    """Every image a step uses, over all dp ranks and micro-batches."""
    return sorted(int(i) for r in range(dp) for m in range(grad_acc)
                  for i in images.sample_indices(seed, n, step, m, mbs, grad_acc, r, dp))


def test_sampler_is_pure():
    a = images.sample_indices(1, 50, 7, 1, 4, 2, 1, 2)
    images.epoch_permutation.cache_clear()
    b = images.sample_indices(1, 50, 7, 1, 4, 2, 1, 2)
    assert np.array_equal(a, b) and a.dtype == np.int64


def test_step_covers_same_images_whatever_the_split():
    for step in range(5):
        ref = step_samples(step, 8, 1, 1)
        assert step_samples(step, 4, 2, 1) == ref
        assert step_samples(step, 4, 1, 2) == ref
        assert step_samples(step, 2, 2, 2) == ref


def test_ranks_disjoint_and_epoch_is_a_permutation():
    per_rank = [set(images.sample_indices(0, 40, 0, 0, 10, 1, r, 2)) for r in range(2)]
    assert not per_rank[0] & per_rank[1]
    epoch = [i for step in range(5) for i in step_samples(step, 4, 1, 2, n=40, seed=0)]
    assert sorted(epoch) == list(range(40))  # 5 steps x 8 images = one pass over 40


def test_seed_and_epoch_change_the_order():
    first = images.sample_indices(0, 1000, 0, 0, 16, 1, 0, 1)
    assert not np.array_equal(first, images.sample_indices(1, 1000, 0, 0, 16, 1, 0, 1))
    next_epoch = images.sample_indices(0, 16, 1, 0, 16, 1, 0, 1)  # n=16: step 1 is epoch 1
    assert not np.array_equal(images.sample_indices(0, 16, 0, 0, 16, 1, 0, 1), next_epoch)


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="dp_rank"):
        images.sample_indices(0, 10, 0, 0, 2, 1, 2, 2)


# ---------------------------------------------------------------------------------------
# Held-out shards and the loop's data object
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batches,dp", [(359, 4, 1), (359, 4, 2), (10, 4, 4), (7, 50, 2)])
def test_eval_shards_cover_each_image_once(n, batches, dp):
    shards = [images.eval_shards(n, batches, r, dp) for r in range(dp)]
    assert len({len(s) for s in shards}) == 1  # same forward count on every dp rank
    seen = sorted(int(i) for s in shards for idx in s for i in idx)
    assert seen == list(range(n))
    assert all(len(idx) > 0 for s in shards for idx in s)


def test_eval_shards_need_one_image_per_rank():
    with pytest.raises(ValueError, match="heldout_fraction"):
        images.eval_shards(1, 4, 0, 2)


def test_image_data_batches(digits):
    train, held = images.split(len(digits), 0.2)
    place = Place(micro_batch_size=8, grad_acc=2, dp_rank=1, dp_size=2, eval_batches=4)
    data = images.ImageData(train=digits.subset(train), heldout=digits.subset(held), seed=1,
                            place=place)
    batch = data.batch(3, 1)
    assert tuple(batch["images"].shape) == (8, 1, 8, 8) and tuple(batch["labels"].shape) == (8,)
    assert np.array_equal(batch["labels"], data.batch(3, 1)["labels"])
    evals = data.eval_batches()
    assert len(evals) == 4 and sum(len(b["labels"]) for b in evals) == 179  # 359 // 2 ranks


def test_class_count_must_match(digits):
    images.check_classes(digits, 10)
    with pytest.raises(ValueError, match="model.num_classes=10"):
        images.check_classes(digits, 3)


# ---------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------


def write_png(path, color, size=(6, 4), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    """cats: 2 red images; dogs: 1 grey (L mode), 1 blue jpg; plus files to ignore."""
    root = tmp_path / "pets"
    write_png(root / "cats" / "a.png", (255, 0, 0))
    write_png(root / "cats" / "b.png", (255, 0, 0), size=(20, 20))
    write_png(root / "dogs" / "c.png", 128, mode="L")
    Image.new("RGB", (5, 5), (0, 0, 255)).save(root / "dogs" / "d.jpg", quality=100)
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write_png(root / ".hidden" / "x.png", (0, 0, 0))
    return root


def test_image_folder_classes_and_labels(folder):
    ds = images.image_folder(folder, size=4, channels=3)
    assert ds.classes == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 1, 1]
    batch = ds.batch([0, 1, 2, 3])
    assert tuple(batch["images"].shape) == (4, 3, 4, 4)
    assert np.allclose(batch["images"][0, 0], 1.0) and np.allclose(batch["images"][0, 1], 0.0)
    assert np.allclose(batch["images"][2], 128 / 255)  # grey broadcast to RGB
    assert float(batch["images"][3, 2].mean()) > 0.9 > float(batch["images"][3, 0].mean())


def test_image_folder_grey(folder):
    batch = images.image_folder(folder, size=8, channels=1).batch([2])
    assert tuple(batch["images"].shape) == (1, 1, 8, 8)
    assert np.allclose(batch["images"], 128 / 255)


def test_load_dispatches_on_source(folder):
    cfg = DataConfig(source=DataSource.image_folder, image_root=str(folder))
    assert images.load(cfg, 4, 1).classes == ("cats", "dogs")
    assert len(images.load(DataConfig(source=DataSource.digits), 8, 1)) == 1797
    with pytest.raises(ValueError, match="not an image source"):
        images.load(DataConfig(source=DataSource.stdlib), 8, 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        images.image_folder(tmp_path / "missing", 8, 1)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        images.image_folder(tmp_path / "empty", 8, 1)


# ---------------------------------------------------------------------------------------
# The ViT recipe's preflight lines (image settings that cannot work fail before any process)
# ---------------------------------------------------------------------------------------


def vit_problems(*overrides: str) -> list[str]:
    from mptk.config.load import compose
    from mptk.train.preflight import PreflightError, preflight

    try:
        preflight(compose(["experiment=vit_digits", *overrides]), 2, False)
    except PreflightError as err:
        return err.problems
    return []


def test_vit_experiment_passes_preflight():
    assert vit_problems() == []


@pytest.mark.parametrize("override,expected", [
    ("model.patch_size=3", "model.patch_size(3) must divide model.image_size(8)"),
    ("model.channels=2", "model.channels(2) must be 1 (grey) or 3 (RGB)"),
    ("data.source=stdlib", "data.source=stdlib is text; the ViT recipe needs images"),
    ("data.source=image_folder", "data.image_root is empty"),
    ("parallel.pp=2 model.seq_length=16", "model.seq_length(16) must be (image_size/patch_size)**2 + 1 = 17"),
])
def test_vit_checks_name_the_fix(override, expected):
    problems = vit_problems(*override.split())
    assert any(expected in line for line in problems), problems


def test_vit_checks_image_folder_classes(folder):
    problems = vit_problems("data.source=image_folder", f"data.image_root={folder}")
    assert any("set model.num_classes=2" in line for line in problems), problems
    assert vit_problems("data.source=image_folder", f"data.image_root={folder}",
                        "model.num_classes=2") == []
