"""Real-data loaders on small files written in each real layout: values round-trip, errors name the file."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from snowfed.config import ConfigError
from snowfed.data.loaders import LOADERS, DataError, load_dataset


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    (image.convert(mode) if mode else image).save(path)
    return path


def _grey(value, size=(4, 4)):
    return np.full(size, value, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ npz


def _medmnist(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (5, 6, 6), dtype=np.uint8),
        "train_labels": np.array([[0], [2], [1], [2], [0]], dtype=np.uint8),
        "val_images": rng.integers(0, 256, (2, 6, 6), dtype=np.uint8),
        "val_labels": np.array([[1], [0]], dtype=np.uint8),
        "test_images": rng.integers(0, 256, (3, 6, 6), dtype=np.uint8),
        "test_labels": np.array([[2], [1], [0]], dtype=np.uint8),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_round_trip_splits_and_grey_to_rgb(tmp_path):
    arrays = _medmnist(tmp_path / "m.npz")
    data = load_dataset({"name": "npz", "path": str(tmp_path / "m.npz")})
    assert data.task == "classification" and data.images.dtype == np.uint8 and data.targets.dtype == np.int64
    assert data.images.shape == (10, 6, 6, 3)
    assert list(data.split) == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    assert np.array_equal(data.images[5, ..., 1], arrays["val_images"][0])  # grey replicated
    assert data.targets.tolist() == [0, 2, 1, 2, 0, 1, 0, 2, 1, 0]
    assert data.class_names == ["0", "1", "2"] and data.num_classes == 3
    assert data.files[5].endswith("m.npz:val[0]") and data.site is None and data.patient is None


def test_a_dataset_the_caller_loaded_is_shared_read_only_and_kept_by_config(tmp_path):
    path = tmp_path / "m.npz"
    _medmnist(path)
    cfg = {"name": "npz", "path": str(path)}
    loaded = {}
    first = load_dataset(cfg, loaded)
    assert load_dataset(dict(cfg), loaded) is first  # a sweep's plans share it
    assert not first.images.flags.writeable and not first.targets.flags.writeable
    assert load_dataset({**cfg, "image_size": 4}, loaded) is not first  # another config: loaded anew
    assert len(loaded) == 2
    _medmnist(path, train_labels=np.array([[1], [1], [1], [1], [1]], dtype=np.uint8))
    assert load_dataset(cfg).targets[:5].tolist() == [1] * 5  # no caller's dict: no copy kept


def test_npz_rgb_missing_splits_class_names_and_resize(tmp_path):
    rgb = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    rgb[1, 0, 0] = (10, 20, 30)
    _medmnist(tmp_path / "m.npz", train_images=rgb, train_labels=np.array([0, 1, 1]),
              val_images=None, val_labels=None, test_images=None, test_labels=None)
    cfg = {"name": "npz", "path": tmp_path / "m.npz", "class_names": ["normal", "tumour", "other"]}
    data = load_dataset(cfg)
    assert data.images[1, 0, 0].tolist() == [10, 20, 30] and list(data.split) == ["train"] * 3
    assert data.class_names == ["normal", "tumour", "other"]
    assert load_dataset({**cfg, "image_size": 9}).images.shape == (3, 9, 9, 3)
    with pytest.raises(ConfigError, match="dataset.class_names"):
        load_dataset({**cfg, "class_names": ["one"]})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_labels": np.array([[0], [1], [-1], [0], [1]])}, "train_labels\\[2\\] = -1 is negative"),
        ({"val_labels": np.zeros((2, 14), dtype=np.uint8)}, "multi-label"),
        ({"train_labels": np.zeros(4, dtype=np.uint8)}, "5 images but train_labels 4 labels"),
        ({"test_images": np.zeros((3, 6, 6), dtype=np.float32)}, "test_images has dtype float32"),
        ({"test_images": np.zeros((3, 6), dtype=np.uint8)}, "must be \\(N, H, W\\) grey"),
        ({"val_images": np.zeros((2, 7, 7), dtype=np.uint8)}, "val_images are 7x7"),
        ({"train_images": None}, "no key train_images"),
        ({"test_images": None}, "no key test_images"),
    ],
)
def test_npz_errors_name_the_file_and_key(tmp_path, overrides, message):
    _medmnist(tmp_path / "m.npz", **overrides)
    with pytest.raises(DataError, match=message) as err:
        load_dataset({"name": "npz", "path": str(tmp_path / "m.npz")})
    assert err.value.file == str(tmp_path / "m.npz") and str(tmp_path / "m.npz") in str(err.value)


def test_npz_skip_bad_drops_negative_labels(tmp_path):
    _medmnist(tmp_path / "m.npz", val_labels=np.array([[-1], [1]]))
    data = load_dataset({"name": "npz", "path": str(tmp_path / "m.npz"), "skip_bad": True})
    assert len(data.targets) == 9 and list(data.split).count("val") == 1
    assert [s["file"].endswith("m.npz:val[0]") for s in data.skipped] == [True]


def test_npz_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=None"):
        load_dataset({"name": "npz", "path": None})
    with pytest.raises(DataError, match="no such file") as err:
        load_dataset({"name": "npz", "path": str(tmp_path / "absent.npz")})
    assert "absent.npz" in str(err.value)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all" * 10)
    _medmnist(tmp_path / "m.npz")
    good = (tmp_path / "m.npz").read_bytes()
    directory = good.index(b"PK\x01\x02")  # first entry of the zip's central directory
    broken = {
        "garbage.npz": (b"not a zip at all" * 10, "is not a readable .npz"),
        "cut.npz": (good[:-40], "is not a readable .npz"),
        "crc.npz": (good[:200] + b"x" * 100 + good[300:], "key train_images cannot be read"),
        "directory.npz": (good[:directory] + b"XX" + good[directory + 2 :], "is a corrupt .npz"),
    }
    for name, (content, message) in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=f"{name}: {message}"):
            load_dataset({"name": "npz", "path": str(tmp_path / name)})


# ---------------------------------------------------------------------------------- image_folder


def test_image_folder_classes_sorted_values_and_modes(tmp_path):
    _png(tmp_path / "tumour" / "a.png", _grey(200))  # grey (L)
    _png(tmp_path / "normal" / "b.png", np.full((4, 4, 3), (1, 2, 3)))  # RGB
    _png(tmp_path / "normal" / "c.png", np.full((4, 4, 3), (9, 8, 7)), mode="RGBA")
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [50, 60, 70])
    palette.save(tmp_path / "normal" / "d.png")
    (tmp_path / "normal" / "notes.txt").write_text("ignored")
    data = load_dataset({"name": "image_folder", "path": str(tmp_path)})
    assert data.class_names == ["normal", "tumour"] and data.targets.tolist() == [0, 0, 0, 1]
    assert data.images.shape == (4, 4, 4, 3) and data.images.dtype == np.uint8
    assert data.images[0, 0, 0].tolist() == [1, 2, 3] and data.images[1, 0, 0].tolist() == [9, 8, 7]
    assert data.images[2, 0, 0].tolist() == [50, 60, 70] and data.images[3, 0, 0].tolist() == [200] * 3
    assert data.split is None and data.site is None and data.patient is None and data.skipped == []
    assert data.files[3] == str(tmp_path / "tumour" / "a.png")


def test_image_folder_sites_patients_and_resize(tmp_path):
    _png(tmp_path / "siteB" / "benign" / "P07_x.png", _grey(1))
    _png(tmp_path / "siteA" / "malignant" / "P01_x.png", _grey(2, (6, 6)))
    _png(tmp_path / "siteA" / "benign" / "P02_y.png", _grey(3))
    cfg = {"name": "image_folder", "path": str(tmp_path), "layout": "sites", "image_size": 5,
           "patient_pattern": r"^(P\d+)_"}
    data = load_dataset(OmegaConf.create(cfg))  # as Hydra hands it over
    assert data.class_names == ["benign", "malignant"] and data.targets.tolist() == [0, 1, 0]
    assert data.site.tolist() == ["siteA", "siteA", "siteB"]
    assert data.patient.tolist() == ["P02", "P01", "P07"]
    assert data.images.shape == (3, 5, 5, 3) and data.images[1].min() == data.images[1].max() == 2
    _png(tmp_path / "siteB" / "benign" / "scan.png", _grey(4))
    with pytest.raises(DataError, match="scan.png: name 'scan' does not match dataset.patient_pattern"):
        load_dataset(cfg)


def test_image_folder_errors_name_the_file(tmp_path):
    cfg = {"name": "image_folder", "path": str(tmp_path)}
    with pytest.raises(DataError, match="no class folder") as err:
        load_dataset(cfg)
    assert err.value.file == str(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: class folder holds no image"):
        load_dataset(cfg)
    _png(tmp_path / "empty" / "a.png", _grey(0, (4, 4)))
    _png(tmp_path / "empty" / "b.png", _grey(0, (4, 6)))
    with pytest.raises(DataError, match="b.png: is 6x4 pixels .*/a.png is 4x4; set dataset.image_size"):
        load_dataset(cfg)
    (tmp_path / "empty" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="b.png: not a readable image"):
        load_dataset(cfg)
    data = load_dataset({**cfg, "skip_bad": True})
    assert len(data.images) == 1 and data.skipped[0]["file"] == str(tmp_path / "empty" / "b.png")
    assert "not a readable image" in data.skipped[0]["reason"]
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(tmp_path / "empty" / "b.png")
    with pytest.raises(DataError, match="b.png: has image mode I;16"):
        load_dataset(cfg)


# ------------------------------------------------------------------------------------ seg_folder


def _two_blobs():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[1:3, 1:3] = 255
    mask[3, 3] = 255  # touches the first blob diagonally: same 8-connected component
    mask[5:7, 5:8] = 255
    return mask


def test_seg_folder_glas_style_components(tmp_path):
    _png(tmp_path / "train_1.png", np.full((8, 8, 3), (10, 20, 30)))
    _png(tmp_path / "train_1_anno.png", _two_blobs())
    _png(tmp_path / "train_2.bmp", _grey(77, (8, 8)))
    _png(tmp_path / "train_2_anno.bmp", np.zeros((8, 8)))
    data = load_dataset({"name": "seg_folder", "path": str(tmp_path)})
    assert data.task == "segmentation" and data.class_names == ["background", "object"]
    assert data.targets.dtype == np.int32 and data.targets.shape == (2, 8, 8)
    assert data.images[0, 0, 0].tolist() == [10, 20, 30] and data.images[1, 0, 0].tolist() == [77] * 3
    first = data.targets[0]
    assert set(np.unique(first)) == {0, 1, 2} and first[1, 1] == first[3, 3] != first[5, 5]
    assert (first > 0).sum() == (_two_blobs() > 0).sum() and data.targets[1].max() == 0
    assert data.files == [str(tmp_path / "train_1.png"), str(tmp_path / "train_2.bmp")]


def test_seg_folder_masks_subfolder_instance_ids_and_resize(tmp_path):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0:4, 0:4], mask[0:4, 4:8], mask[6:8, 6:8] = 40, 7, 200  # two touching objects + one more
    _png(tmp_path / "images" / "p1_a.png", _grey(5, (8, 8)))
    _png(tmp_path / "masks" / "p1_a.tif", mask)
    cfg = {"name": "seg_folder", "path": str(tmp_path), "objects": "instance", "patient_pattern": "^(p\\d)_"}
    data = load_dataset(cfg)
    target = data.targets[0]
    assert target.max() == 3 and len({target[0, 0], target[0, 7], target[7, 7]}) == 3  # ids 1..K
    assert (target[mask == 0] == 0).all() and data.patient.tolist() == ["p1"]
    assert load_dataset({**cfg, "objects": "components"}).targets[0].max() == 2  # touching ones merge
    resized = load_dataset({**cfg, "image_size": 16})
    assert resized.images.shape == (1, 16, 16, 3) and resized.targets.shape == (1, 16, 16)
    assert set(np.unique(resized.targets)) == {0, 1, 2, 3}  # nearest: ids stay ids
    assert resized.targets[0, 0, 0] == target[0, 0] and resized.targets[0, 15, 15] == target[7, 7]


def test_seg_folder_sites(tmp_path):
    for site in ("hospA", "hospB"):
        _png(tmp_path / site / "x.png", _grey(1, (6, 6)))
        _png(tmp_path / site / "x_anno.png", _grey(1, (6, 6)))
    data = load_dataset({"name": "seg_folder", "path": str(tmp_path), "layout": "sites"})
    assert data.site.tolist() == ["hospA", "hospB"] and (data.targets == 1).all()


def test_seg_folder_errors_name_the_file(tmp_path):
    cfg = {"name": "seg_folder", "path": str(tmp_path)}
    with pytest.raises(DataError, match="holds no image") as err:
        load_dataset(cfg)
    assert err.value.file == str(tmp_path)
    _png(tmp_path / "a.png", _grey(0, (8, 8)))
    with pytest.raises(DataError, match="a.png: image without a mask; expected its mask as <name>_anno"):
        load_dataset(cfg)
    _png(tmp_path / "b_anno.png", _grey(0, (8, 8)))
    with pytest.raises(DataError, match="b_anno.png: mask without an image named b"):
        load_dataset(cfg)
    (tmp_path / "b_anno.png").unlink()
    _png(tmp_path / "a_anno.png", _grey(0, (8, 6)))
    with pytest.raises(DataError, match="a_anno.png: mask is 6x8 pixels .*/a.png is 8x8"):
        load_dataset(cfg)
    _png(tmp_path / "a_anno.png", np.dstack([_grey(0, (8, 8)), _grey(1, (8, 8)), _grey(0, (8, 8))]))
    with pytest.raises(DataError, match="a_anno.png: .*masks must be single-channel"):
        load_dataset(cfg)
    (tmp_path / "a_anno.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="a_anno.png: not a readable image"):
        load_dataset(cfg)
    _png(tmp_path / "c.png", _grey(0, (8, 8)))
    _png(tmp_path / "c_anno.png", _grey(0, (8, 8)))
    data = load_dataset({**cfg, "skip_bad": True})
    assert len(data.images) == 1 and [s["file"] for s in data.skipped] == [str(tmp_path / "a_anno.png")]
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="has a masks/ folder but no images/ folder"):
        load_dataset(cfg)


# ---------------------------------------------------------------------------------- digits, config


def test_digits():
    data = load_dataset({"name": "digits", "image_size": 8})
    assert data.images.shape == (1797, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert (data.images[..., 0] == data.images[..., 2]).all()
    assert data.class_names == [str(c) for c in range(10)] and data.num_classes == 10
    assert sorted(set(data.targets.tolist())) == list(range(10)) and data.targets.dtype == np.int64
    assert data.split is None and data.site is None and data.patient is None
    assert load_dataset({"name": "digits", "image_size": 16}).images.shape == (1797, 16, 16, 3)


def test_config_keys_are_checked():
    names = "one of npz, image_folder, seg_folder, digits"
    with pytest.raises(ConfigError, match=f"dataset.name='mnist'.*{names}"):
        load_dataset({"name": "mnist"})
    with pytest.raises(ConfigError, match="dataset.size=.*a key of dataset digits \\(name, image_size\\)"):
        load_dataset({"name": "digits", "size": 16})
    with pytest.raises(ConfigError, match="dataset.image_size"):
        load_dataset({"name": "digits", "image_size": 0})
    with pytest.raises(ConfigError, match="dataset.layout"):
        load_dataset({"name": "image_folder", "path": ".", "layout": "hospitals"})
    with pytest.raises(ConfigError, match="dataset.patient_pattern"):
        load_dataset({"name": "image_folder", "path": ".", "patient_pattern": "no_group"})


def test_yaml_defaults_match_the_loaders():
    from importlib import resources

    for name in LOADERS:
        cfg = OmegaConf.create((resources.files("snowfed.configs") / "dataset" / f"{name}.yaml").read_text())
        assert cfg.name == name
        if name == "digits":
            assert len(load_dataset(cfg).images) == 1797
        else:
            with pytest.raises(ConfigError, match="dataset.path=None"):  # every key known, path required
                load_dataset(cfg)
