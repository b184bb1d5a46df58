"""Object removal (PAPER_PROTOCOL §1.2): inpainted twins that differ from their original only
inside the dilated mask, written losslessly and atomically under the names `pair_with_removed`
reads; the LaMa path's errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm.cli import main
from hooked_vlm.data import inpainters
from hooked_vlm.data.coco import load_coco, pair_with_removed
from hooked_vlm.data.inpainters import LamaInpainter, OpenCVInpainter
from hooked_vlm.data.removal import remove_objects, removed_name
from hooked_vlm.data.shapes import dilate_mask

NO_FILTERS = dict(min_area=0, max_area=1, min_short_side=0)


def _rectangle(ann_id, image_id, x, y, w, h, category_id=1):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0, "area": w * h,
            "bbox": [x, y, w, h], "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}  # fmt: skip


@pytest.fixture
def coco(tmp_path, photos):
    """Two JPEG photos (as COCO ships them), one with two annotated objects: (annotation file, image folder)."""
    images = tmp_path / "val"
    images.mkdir()
    records = []
    for image_id, name in ((1, "rocket"), (2, "coffee")):
        photos[name].resize((96, 72)).save(images / f"{image_id:012d}.jpg", quality=90)
        records.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 96, "height": 72})
    annotations = [_rectangle(11, 1, 30, 20, 24, 30), _rectangle(12, 2, 10, 10, 20, 16), _rectangle(13, 2, 60, 40, 20, 20, 2)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": 1, "name": "rocket"}, {"id": 2, "name": "cup"}]}))  # fmt: skip
    return path, images


@pytest.fixture
def subset(coco):
    return load_coco(*coco, **NO_FILTERS)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_removal_changes_only_the_dilated_mask(subset, tmp_path):
    remove_objects(subset, tmp_path / "removed", dilation=3, progress=False)
    for item in subset:
        original, removed = _pixels(item.image_path), _pixels(tmp_path / "removed" / removed_name(item))
        region = dilate_mask(item.mask(), 3)
        assert np.array_equal(removed[~region], original[~region])  # byte-identical outside
        assert (removed != original).any(-1)[item.mask()].mean() > 0.9  # the object itself is painted over


def test_each_object_is_removed_from_its_own_copy_of_a_shared_image(subset, tmp_path):
    remove_objects(subset, tmp_path / "removed", dilation=2, progress=False)
    first, second = (item for item in subset if item.image_id == 2)
    removed_first = _pixels(tmp_path / "removed" / removed_name(first))
    assert np.array_equal(removed_first[second.mask()], _pixels(second.image_path)[second.mask()])


def test_removed_images_are_lossless_pngs_that_pair_with_their_originals(subset, tmp_path):
    remove_objects(subset, tmp_path / "removed", progress=False)
    pairs = pair_with_removed(subset, tmp_path / "removed", require_all=True)
    assert [p.item.annotation_id for p in pairs] == [11, 12, 13]
    assert all(Image.open(p.removed_image_path).format == "PNG" for p in pairs)


def test_a_rerun_skips_the_finished_objects(subset, tmp_path):
    first = remove_objects(subset[:2], tmp_path / "removed", progress=False)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "removed").glob("*.png")}
    second = remove_objects(subset, tmp_path / "removed", progress=False)
    assert first.written == [11, 12] and second.skipped == [11, 12] and second.written == [13]
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())


def test_a_rerun_with_other_settings_is_an_error_unless_overwriting(subset, tmp_path):
    remove_objects(subset, tmp_path / "removed", dilation=3, progress=False)
    with pytest.raises(ValueError, match="made with .*'dilation': 3.*overwrite"):
        remove_objects(subset, tmp_path / "removed", dilation=6, progress=False)
    report = remove_objects(subset, tmp_path / "removed", dilation=6, overwrite=True, progress=False)
    assert report.written == [11, 12, 13]
    assert json.loads((tmp_path / "removed" / "removal.json").read_text())["dilation"] == 6


def test_a_run_that_dies_mid_write_leaves_no_partial_image(subset, tmp_path, monkeypatch):
    def torn_save(self, fp, format=None, **kwargs):  # a crash after half the bytes are out
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        remove_objects(subset, tmp_path / "removed", progress=False)
    monkeypatch.undo()
    assert list((tmp_path / "removed").iterdir()) == [tmp_path / "removed" / "removal.json"]
    (tmp_path / "removed" / ".1_11.png.999.part").write_bytes(b"\x89PNG")  # what a SIGKILL would leave
    assert len(pair_with_removed(subset, tmp_path / "removed")) == 0
    assert remove_objects(subset, tmp_path / "removed", progress=False).written == [11, 12, 13]


def test_an_inpainter_must_return_the_images_shape(subset, tmp_path):
    class Cropping:
        def settings(self):
            return {"name": "cropping"}

        def __call__(self, image, mask):
            return image[:-1]

    with pytest.raises(ValueError, match=r"inpainter returned uint8 \(71, 96, 3\); expected uint8 \(72, 96, 3\)"):
        remove_objects(subset, tmp_path / "removed", inpainter=Cropping(), progress=False)


def test_opencv_inpainting_without_opencv_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        OpenCVInpainter()(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool))


def test_lama_without_weights_or_connection_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("LAMA_MODEL", raising=False)

    def offline(url, dst, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"could not download .*Name or service.*curl -L -o big-lama.pt .*--lama-weights"):
        LamaInpainter()
    with pytest.raises(FileNotFoundError, match=r"LaMa weights not found: .*missing.pt.*curl"):
        LamaInpainter(weights=tmp_path / "missing.pt")
    assert not list((tmp_path / "torch").rglob("*big-lama*"))  # no partial download left behind


def test_lama_refuses_a_file_that_is_not_torchscript(tmp_path):
    torch.save({"generator": torch.zeros(2)}, tmp_path / "best.ckpt")
    with pytest.raises(ValueError, match="not a TorchScript model"):
        LamaInpainter(weights=tmp_path / "best.ckpt", device="cpu")


class _FillWithGrey(torch.nn.Module):
    """A stand-in for big-lama.pt with its interface: (image [1,3,H,W] in [0,1], mask [1,1,H,W]) ->
    image; it insists on sides divisible by 8, as LaMa does."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert image.shape[-1] % 8 == 0 and image.shape[-2] % 8 == 0
        return image * (1 - mask) + 0.5 * mask


def test_lama_runs_a_torchscript_model_at_the_images_own_size(tmp_path):
    torch.jit.save(torch.jit.script(_FillWithGrey()), tmp_path / "big-lama.pt")
    lama = LamaInpainter(weights=tmp_path / "big-lama.pt", device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    mask = np.zeros((30, 45), bool)
    mask[5:12, 7:20] = True
    out = lama(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[mask] == 128).all() and np.array_equal(out[~mask], image[~mask])
    assert lama.settings() == {"name": "lama", "weights_md5": inpainters._md5(tmp_path / "big-lama.pt")}


def test_the_command_writes_the_twins_of_the_selected_annotations(coco, tmp_path, capsys):
    annotations, images = coco
    out = tmp_path / "removed"
    assert main(["remove-objects", "--coco", str(annotations), "--images", str(images), "--out", str(out),
                 "--filters", "none", "--dilation", "2", "--method", "ns"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["1_11.png", "2_12.png", "2_13.png"]
    assert json.loads((out / "removal.json").read_text())["inpainter"] == {"name": "opencv", "method": "ns", "radius": 5}
    assert "3 written" in capsys.readouterr().out
