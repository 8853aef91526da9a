"""Datasets in their published layouts (CUB_200_2011, VTAB-1k lists, FGVC JSON), timm dataset specs, and the
refusals at select (issue 17, items 1-3 and "Bad input")."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, TINY_VIT, write_images
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.data import discover
from fps_cli.errors import DataError

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_cub(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """CUB_200_2011 as downloaded: images/<class>/..., images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt; the first half of each class trains."""
    root = root / "CUB_200_2011"
    images, labels, split, names = [], [], [], []
    image_id = 0
    for c in range(classes):
        name = f"{c + 1:03d}.Bird_{c}"
        names.append(f"{c + 1} {name}")
        write_images(root / "images" / name, per_class, CLASS_COLORS[c], seed=c)
        for i in range(per_class):
            image_id += 1
            images.append(f"{image_id} {name}/img_{i:03d}.png")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(i < per_class // 2)}")
    for file, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", names),
    ):
        (root / file).write_text("\n".join(lines) + "\n")
    return root


def make_vtab(root: Path, task: str = "dtd", classes: int = 3, per_class: int = 4) -> Path:
    """A VTAB-1k task folder as NOAH / GPS ship it: images/ and list files of `path label` lines."""
    root = root / task
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for c in range(classes):
        write_images(root / "images" / f"c{c}", per_class, CLASS_COLORS[c], seed=c)
        for i in range(per_class):
            which = "train800" if i < per_class // 2 else "val200" if i == per_class // 2 else "test"
            lists[which].append(f"images/c{c}/img_{i:03d}.png {c}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, lines in lists.items():
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_fgvc_json(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """An FGVC dataset with VPT's split files: train.json / val.json / test.json of {relative path: class id}."""
    root = root / "OxfordFlower"
    splits: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for c in range(classes):
        write_images(root / "images" / f"k{c}", per_class, CLASS_COLORS[c], seed=c)
        for i in range(per_class):
            which = "train" if i < per_class // 2 else "val" if i == per_class // 2 else "test"
            splits[which][f"k{c}/img_{i:03d}.png"] = c
    for name, entries in splits.items():
        (root / f"{name}.json").write_text(json.dumps(entries, indent=1))
    return root


# ------------------------------------------------------------------------------------------ detection


def test_cub_as_downloaded_uses_its_own_split(tmp_path):
    folder = discover(make_cub(tmp_path))
    assert folder.layout == "cub"
    assert len(folder.train.samples) == 6 and len(folder.val.samples) == 6 and folder.test is folder.val
    assert folder.train.classes == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    assert {label for _, label in folder.train.samples} == {0, 1, 2}
    train, val = {p for p, _ in folder.train.samples}, {p for p, _ in folder.val.samples}
    assert not train & val
    assert all(p.name in ("img_000.png", "img_001.png") for p in train)  # is_train=1: the first half of each class
    assert folder.provenance() == {
        "layout": "cub",
        "train_split": "is_train=1",
        "val_split": "is_train=0",
        "test_split": "is_train=0",
    }
    assert folder.describe() == "cub layout: train is_train=1 (6 images), val+test is_train=0 (6 images)"


def test_vtab_trains_on_train800val200_and_validates_on_test(tmp_path):
    folder = discover(make_vtab(tmp_path))
    assert folder.layout == "vtab"
    assert folder.train.name == "train800val200" and len(folder.train.samples) == 9
    assert folder.val.name == "test" and len(folder.val.samples) == 3
    assert folder.train.classes == [str(i) for i in range(47)]  # dtd: 47 classes, as VTAB-1k has
    assert len(folder.split("train800").samples) == 6 and len(folder.split("val200").samples) == 3
    with pytest.raises(DataError, match="has no 'nope' split; it has: train, val, test, train800, val200"):
        folder.split("nope")


def test_fgvc_json_splits_as_gps_reads_them(tmp_path):
    """GPS's FGVC dataset: train on train.json + val.json, test on test.json, class ids sorted to 0..C-1."""
    root = make_fgvc_json(tmp_path)
    for name in ("train", "val", "test"):  # ids 10, 20, 30: not contiguous, not from 0
        entries = {k: (v + 1) * 10 for k, v in json.loads((root / f"{name}.json").read_text()).items()}
        (root / f"{name}.json").write_text(json.dumps(entries))
    folder = discover(root)
    assert folder.layout == "fgvc-json"
    assert (folder.train.name, folder.val.name, folder.test.name) == ("train.json+val.json", "test.json", "test.json")
    assert [len(s.samples) for s in (folder.train, folder.val)] == [9, 3]
    assert [len(folder.split(n).samples) for n in ("train.json", "val.json", "val")] == [6, 3, 3]
    assert folder.describe() == "fgvc-json layout: train train.json+val.json (9 images), val+test test.json (3 images)"
    assert folder.train.classes == ["10", "20", "30"]
    assert sorted({label for _, label in folder.train.samples}) == [0, 1, 2]
    assert folder.train.samples[0] == (root / "images" / "k0" / "img_000.png", 0)


def test_two_layouts_in_one_folder_ask_for_dataset_format(tmp_path):
    root = make_cub(tmp_path)
    (root / "train.json").write_text(json.dumps({"001.Bird_0/img_000.png": 0}))
    (root / "test.json").write_text(json.dumps({"001.Bird_0/img_002.png": 0}))
    with pytest.raises(DataError, match=r"several layouts \(cub, fgvc-json\); pass --dataset-format cub"):
        discover(root)
    assert discover(root, "cub").layout == "cub"
    forced = discover(root, "fgvc-json")
    assert forced.layout == "fgvc-json" and len(forced.train.samples) == 1


# ------------------------------------------------------------------------------------------ bad input


def _select_fails(data: Path, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "m.safetensors"
    result = fps("select", *TINY_VIT, "--data", data, "--budget", "0.05", *FAST, "-o", out, *extra)
    assert result.exit_code == 1, result.output
    assert not out.exists() and not Path("scores.safetensors").exists()
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_cub_images_txt_naming_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_cub(tmp_path)
    (root / "images" / "002.Bird_1" / "img_001.png").unlink()
    line = _select_fails(root, tmp_path)
    assert line == f"error: {root / 'images.txt'}:6: {root / 'images' / '002.Bird_1' / 'img_001.png'} does not exist"


def test_vtab_line_with_an_unknown_label_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_vtab(tmp_path)
    lines = (root / "test.txt").read_text().splitlines()
    (root / "test.txt").write_text("\n".join([*lines[:1], "images/c1/img_003.png 47", *lines[2:]]) + "\n")
    assert _select_fails(root, tmp_path) == f"error: {root / 'test.txt'}:2: unknown label '47' (dtd has labels 0..46)"
    (root / "test.txt").write_text("\n".join([*lines[:2], "images/c9/nothere.png 1"]) + "\n")
    missing = root / "images" / "c9" / "nothere.png"
    assert _select_fails(root, tmp_path) == f"error: {root / 'test.txt'}:3: {missing} does not exist"


def test_a_split_file_putting_an_image_in_train_and_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_vtab(tmp_path)
    with (root / "test.txt").open("a") as f:
        f.write("images/c2/img_000.png 2\n")  # also line 5 of train800val200.txt
    line = _select_fails(root, tmp_path)
    assert line == (
        f"error: test.txt:4: {root / 'images' / 'c2' / 'img_000.png'} is also a training image "
        "(train800val200.txt:5); train and evaluation must not share images: fix the split file"
    )


def test_cub_split_file_listing_an_image_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_cub(tmp_path)
    with (root / "train_test_split.txt").open("a") as f:
        f.write("1 0\n")  # image 1 again, now as a test image
    assert _select_fails(root, tmp_path) == (
        f"error: {root / 'train_test_split.txt'}:13: image id 1 is listed again (first on line 1)"
    )


def test_fgvc_json_with_an_image_in_train_and_test(tmp_path):
    root = make_fgvc_json(tmp_path)
    entries = json.loads((root / "test.json").read_text())
    entries["k0/img_000.png"] = 0
    (root / "test.json").write_text(json.dumps(entries, indent=1))
    with pytest.raises(DataError, match=r"^test.json:\d+: .*img_000.png is also a training image \(train.json:2\)"):
        discover(root)


# --------------------------------------------------------------------------------- refusals at select


def test_cub_images_folder_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_cub(tmp_path)
    line = _select_fails(root / "images", tmp_path)
    assert line == (
        f"error: {root / 'images'} is the image folder of a cub dataset as downloaded (its split files are in "
        f"{root}); pass the folder itself: --data {root}, so its train / test split is used"
    )


def test_one_class_folder_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "download"
    write_images(root / "images" / "all", 3)
    result = fps("select", "--model", "no_such_model_anywhere", "--data", root, "--budget", "0.05", *FAST)
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {root} has only one class folder (images); a dataset needs a folder of class folders")
    )  # the data is refused, not the model: nothing was built


def test_select_and_train_on_cub_record_the_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_cub(tmp_path)
    result = fps("select", *TINY_VIT, "--data", root, "--budget", "0.05", *FAST)
    assert result.exit_code == 0, result.output
    assert "cub layout: train is_train=1 (6 images), val+test is_train=0 (6 images)" in result.stderr
    from fps_cli import read_mask

    prov = read_mask("mask.safetensors").provenance
    assert prov["num_samples"] == 6  # the training split only, never the test images
    assert (prov["layout"], prov["train_split"], prov["val_split"]) == ("cub", "is_train=1", "is_train=0")
    trained = fps("train", "--epochs", "1", *FAST, "--json")
    assert trained.exit_code == 0, trained.output
    assert "cub layout" in trained.stderr
    evaluated = fps("eval", "--split", "test", *FAST, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["samples"] == 6


# ------------------------------------------------------------------------------------------ timm specs


def _tar_of_classes(tmp_path: Path) -> Path:
    src = tmp_path / "classes"
    for c in range(3):
        write_images(src / f"class_{c}", 3, CLASS_COLORS[c], seed=c)
    tar = tmp_path / "data.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname=".")
    return tar


def test_tar_of_class_folders_through_timm(tmp_path):
    folder = discover(_tar_of_classes(tmp_path))
    assert folder.layout == "timm" and folder.val is None
    assert folder.train.classes == ["class_0", "class_1", "class_2"]
    assert sorted(label for _, label in folder.train.samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    from fps_cli.data import ImageDataset

    image, label, _, error = ImageDataset(folder.train.samples, None)[4]
    assert error == "" and image.size == (32, 32) and label == folder.train.samples[4][1]


def test_torch_folder_spec_selects_and_records_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "tv"
    for c in range(3):
        write_images(root / "train" / f"c{c}", 3, CLASS_COLORS[c], seed=c)
        write_images(root / "val" / f"c{c}", 1, CLASS_COLORS[c], seed=10 + c)
    folder = discover(f"torch/folder@{root}")
    assert (len(folder.train.samples), len(folder.val.samples)) == (9, 3)
    result = fps("select", *TINY_VIT, "--data", f"torch/folder@{root}", "--budget", "0.05", *FAST, "--json")
    assert result.exit_code == 0, result.output
    from fps_cli import read_mask

    prov = read_mask("mask.safetensors").provenance
    assert prov["data"] == f"torch/folder@{root}" and prov["num_samples"] == 9 and prov["layout"] == "timm"


def test_tar_select_matches_the_same_images_as_a_folder(tmp_path, monkeypatch):
    """The tar route reads the same pixels: its statistics equal those of the extracted folder."""
    monkeypatch.chdir(tmp_path)
    tar = _tar_of_classes(tmp_path)
    common = [*TINY_VIT, "--budget", "0.05", *FAST, "--json"]
    assert fps("select", *common, "--data", tar, "-o", "a.safetensors", "--scores", "sa.safetensors").exit_code == 0
    b = fps("select", *common, "--data", tmp_path / "classes", "-o", "b.safetensors", "--scores", "sb.safetensors")
    assert b.exit_code == 0, b.output
    from safetensors.torch import load_file

    a, b = load_file("sa.safetensors"), load_file("sb.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


def test_streamed_and_missing_specs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"a streamed dataset \(wds/\) has no length and no random access"):
        discover(f"wds/shards@{tmp_path}")
    with pytest.raises(DataError, match=r"a torchvision dataset needs its folder: --data torch/cifar10@ROOT"):
        discover("torch/cifar10")
    with pytest.raises(DataError, match=r"torch/cifar10@.*: timm cannot read the train split"):
        discover(f"torch/cifar10@{tmp_path}")  # not there, and fps never downloads


def test_the_folder_above_a_dataset_names_the_dataset_folder(tmp_path):
    from fps_cli.data import check_selectable

    root = make_cub(tmp_path / "downloads")
    with pytest.raises(DataError, match=rf"\(it holds the split files of a cub dataset: pass --data {root}\)"):
        check_selectable(discover(root.parent))


def _idx(path: Path, array) -> None:
    """An MNIST idx file (big-endian header: magic 0x08 0x<dims>, then each dimension), as torchvision reads it."""
    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_torch_mnist_spec_reads_a_local_copy_and_never_downloads(tmp_path):
    import numpy as np

    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 0, 1, 2]))
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte", np.array([2, 1, 0]))
    folder = discover(f"torch/mnist@{tmp_path / 'mnist'}")
    assert (folder.train.name, folder.val.name) == ("train", "test")
    assert [label for _, label in folder.train.samples] == [0, 1, 2, 0, 1, 2]
    assert [label for _, label in folder.val.samples] == [2, 1, 0]
    assert folder.train.classes[0] == "0 - zero" and len(folder.train.classes) == 10
    from fps_cli.data import ImageDataset

    image, label, _, error = ImageDataset(folder.val.samples, None)[0]
    assert error == "" and image.mode == "RGB" and image.size == (28, 28) and label == 2


def test_train_reads_the_data_the_way_select_was_told_to(tmp_path, monkeypatch):
    """A folder that fits two layouts: --dataset-format at select is recorded, and train follows it."""
    monkeypatch.chdir(tmp_path)
    root = make_cub(tmp_path)
    (root / "train.json").write_text(json.dumps({"001.Bird_0/img_000.png": 0, "002.Bird_1/img_000.png": 1}))
    (root / "test.json").write_text(json.dumps({"001.Bird_0/img_002.png": 0}))
    assert fps("select", *TINY_VIT, "--data", root, "--budget", "0.05", *FAST, "-q").exit_code == 1  # ambiguous
    result = fps("select", *TINY_VIT, "--data", root, "--dataset-format", "cub", "--budget", "0.05", *FAST)
    assert result.exit_code == 0, result.output
    trained = fps("train", "--epochs", "1", *FAST)
    assert trained.exit_code == 0, trained.output
    assert "cub layout: train is_train=1 (6 images), val+test is_train=0 (6 images)" in trained.stderr


def test_inspect_names_the_layout_and_splits_a_mask_was_selected_on(tmp_path):
    root = make_cub(tmp_path)
    mask, scores = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    selected = fps("select", *TINY_VIT, "--data", root, "--budget", "0.5", "-o", mask, "--scores", scores, "-q")
    assert selected.exit_code == 0, selected.output
    for path in (mask, scores):
        shown = fps("inspect", path)
        assert shown.exit_code == 0, shown.output
        line = "layout cub; train_split is_train=1; val_split is_train=0; test_split is_train=0"
        assert line in shown.stdout, shown.stdout
