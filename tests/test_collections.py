"""Image collections (a folder in ImageNet-val layouts, a `datasets` dataset), and the mean
embedding and position probes computed over them with their provenance."""

from __future__ import annotations

import json
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hooked_vlm import interventions as iv
from hooked_vlm.cli import main
from hooked_vlm.data.collections import (
    DatasetImages,
    ImageFolder,
    ImagesUsed,
    open_collection,
    sample_collection,
    split_collection,
)
from hooked_vlm.experiments import position_probe
from hooked_vlm.experiments.streaming_probe import SiteProbe
from hooked_vlm.model import HookedVLM
from hooked_vlm.testing import build_tiny_llava


def _image(seed, size=(40, 30)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def imagenet_val(tmp_path):
    """ImageNet val in class subfolders (as after valprep.sh), with files that are not images."""
    root = tmp_path / "val"
    for k, (synset, name) in enumerate([("n01440764", "ILSVRC2012_val_00000293.JPEG"), ("n01440764", "ILSVRC2012_val_00002138.JPEG"),
                                        ("n01443537", "ILSVRC2012_val_00000236.JPEG"), ("n01443537", "ILSVRC2012_val_00000262.JPEG"),
                                        ("n01484850", "ILSVRC2012_val_00000994.JPEG"), ("n01484850", "ILSVRC2012_val_00001400.JPEG")]):  # fmt: skip
        (root / synset).mkdir(parents=True, exist_ok=True)
        _image(k).save(root / synset / name, format="JPEG")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    (root / ".cache").mkdir()
    _image(9).save(root / ".cache" / "thumb.png")
    return root


@pytest.fixture
def image_dataset():
    return datasets.Dataset.from_dict({"image": [_image(k) for k in range(5)], "label": list(range(5))},
                                      features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))  # fmt: skip


@pytest.fixture(scope="module")
def toy():
    return HookedVLM.from_pretrained("toy-llava")


def test_a_folder_of_class_subfolders_holds_every_image_in_path_order(imagenet_val):
    folder = ImageFolder(imagenet_val)
    assert len(folder) == 6 and [key.split(":")[0] for key, _ in folder.keyed()][:2] == [
        "n01440764/ILSVRC2012_val_00000293.JPEG", "n01440764/ILSVRC2012_val_00002138.JPEG"]  # fmt: skip
    assert all(image.mode == "RGB" and image.size == (40, 30) for image in folder)


def test_a_flat_folder_reads_the_same(tmp_path):
    for k in range(3):
        _image(k).save(tmp_path / f"ILSVRC2012_val_{k + 1:08d}.JPEG")
    assert len(ImageFolder(tmp_path)) == 3


def test_an_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="no images under"):
        ImageFolder(tmp_path)


def test_the_digest_changes_with_the_file_list(imagenet_val):
    def digest():
        used = ImagesUsed(ImageFolder(imagenet_val))
        list(used)
        return used.provenance()

    before = digest()
    _image(7).save(imagenet_val / "n01484850" / "ILSVRC2012_val_00009999.JPEG")
    after = digest()
    assert before["count"] == 6 and after["count"] == 7 and before["digest"] != after["digest"]
    assert before["source"] == "folder" and before["root"] == str(imagenet_val.resolve())


def test_a_datasets_dataset_gives_its_image_column(image_dataset):
    images = DatasetImages(image_dataset, "image")
    assert len(images) == 5 and np.array_equal(np.asarray(list(images)[2]), np.asarray(_image(2)))
    with pytest.raises(ValueError, match=r"no column 'img'; its columns are \['image', 'label'\]"):
        DatasetImages(image_dataset, "img")


def test_a_streamed_dataset_is_read_in_order_up_to_its_limit(image_dataset):
    stream = DatasetImages(image_dataset.to_iterable_dataset(), "image", limit=3)
    assert [np.asarray(image).sum() for image in stream] == [np.asarray(_image(k)).sum() for k in range(3)]
    with pytest.raises(TypeError, match="not known before it is read"):
        len(DatasetImages(image_dataset.to_iterable_dataset(), "image"))


def test_open_collection_reads_folders_saved_datasets_and_data_files(imagenet_val, image_dataset, tmp_path):
    assert isinstance(open_collection(imagenet_val, limit=2), ImageFolder) and len(open_collection(imagenet_val, limit=2)) == 2
    image_dataset.save_to_disk(tmp_path / "saved")
    assert len(open_collection(tmp_path / "saved")) == 5
    (tmp_path / "files").mkdir()
    image_dataset.to_parquet(tmp_path / "files" / "validation.parquet")
    streamed = open_collection(f"hf:{tmp_path / 'files'}", split="validation", limit=4)  # a local folder of data files, streamed
    assert streamed.streamed and len(list(streamed)) == 4
    with pytest.raises(ValueError, match="name the dataset's split"):
        open_collection("hf:ILSVRC/imagenet-1k")


def test_a_hub_dataset_without_the_datasets_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        open_collection("hf:ILSVRC/imagenet-1k", split="validation")


def test_a_split_is_disjoint_seeded_and_not_by_class(imagenet_val):
    folder = ImageFolder(imagenet_val)
    train, test = split_collection(folder, 4, 2, seed=1)
    assert len(train) == 4 and len(test) == 2 and not set(train.files) & set(test.files)
    assert split_collection(folder, 4, 2, seed=1)[0].files == train.files != split_collection(folder, 4, 2, seed=2)[0].files
    assert train.files != folder.files[:4]  # a random draw, not the first classes of the sorted folder
    with pytest.raises(ValueError, match="holds 6 images, fewer than 5 \\+ 2"):
        split_collection(folder, 5, 2)
    assert len(sample_collection(folder, 10)) == 6


def test_a_streamed_split_takes_the_first_rows_then_the_next(image_dataset):
    train, test = split_collection(DatasetImages(image_dataset.to_iterable_dataset(), "image"), 3, 2)
    assert [key for key, _ in train.keyed()] == ["row 0", "row 1", "row 2"] and [key for key, _ in test.keyed()] == ["row 3", "row 4"]


def test_the_mean_over_a_folder_is_the_mean_over_its_images_and_says_which(toy, imagenet_val):
    folder = ImageFolder(imagenet_val)
    mean = iv.compute_mean_embedding(toy, folder, batch_size=4, progress=False)
    same = iv.compute_mean_embedding(toy, list(folder), batch_size=3, progress=False)
    torch.testing.assert_close(mean.vector, same.vector)
    provenance = mean.provenance
    assert provenance["images"]["count"] == 6 and provenance["images"]["source"] == "folder"
    assert provenance["model"]["name"] == "toy-llava" and provenance["dtype"] == "float32"
    assert provenance["preprocessing"]["image_mode"] == "pad" and provenance["prompt"] == "Describe the image."


def test_the_mean_over_a_dataset_records_the_dataset(toy, image_dataset):
    mean = iv.compute_mean_embedding(toy, DatasetImages(image_dataset, name="my/images"), progress=False)
    assert mean.provenance["images"] | {"digest": None} == {"source": "datasets", "dataset": "my/images", "count": 5, "digest": None,
                                                            "fingerprint": image_dataset._fingerprint}  # fmt: skip


def test_a_mean_loads_onto_its_model_in_another_dtype(toy, imagenet_val, tmp_path):
    path = iv.save_mean(iv.compute_mean_embedding(toy, ImageFolder(imagenet_val), progress=False), tmp_path / "mean.pt")
    loaded = iv.load_mean(path, HookedVLM.from_pretrained("toy-llava", dtype=torch.bfloat16))
    assert loaded.provenance["images"]["count"] == 6


def test_a_mean_of_images_prepared_otherwise_warns_naming_the_setting(toy, imagenet_val, tmp_path):
    path = iv.save_mean(iv.compute_mean_embedding(toy, ImageFolder(imagenet_val), progress=False), tmp_path / "mean.pt")  # pad
    cropping = HookedVLM.from_pretrained("toy-llava")
    cropping.use_settings(image_mode="crop")
    with pytest.warns(UserWarning, match=r"image_mode='pad'.*image_mode='crop'"):
        iv.load_mean(path, cropping)


def test_a_mean_of_another_model_is_an_error_naming_both(tiny_checkpoint, imagenet_val, tmp_path):
    first = HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))
    twin = HookedVLM.from_pretrained(build_tiny_llava(tmp_path / "llava_seed_5", seed=5, key_layout="legacy"))  # same architecture
    path = iv.save_mean(iv.compute_mean_embedding(first, ImageFolder(imagenet_val), progress=False), tmp_path / "mean.pt")
    with pytest.raises(ValueError, match=r"mean.pt was computed on .*llava_base.*not on this model, .*llava_seed_5.*same architecture, other weights"):
        iv.load_mean(path, twin)
    with pytest.raises(ValueError, match="computed on .*llava_base"):
        iv.token_ablation(twin, iv.image_tokens(twin.prepare(_image(0), "Hi")), iv.load_mean(path))


def test_a_mean_without_provenance_still_loads(toy, tmp_path):
    legacy = {"vector": torch.zeros(toy.cfg.d_model), "hook": "hook_inputs_embeds", "count": 3, "views": "all",
              "fingerprint": iv.model_fingerprint(toy)[0], "model": "toy", "format_version": 1}  # fmt: skip
    torch.save(legacy, tmp_path / "old.pt")
    assert iv.load_mean(tmp_path / "old.pt", toy).provenance == {}


def test_the_probes_read_collections_and_record_them(toy, imagenet_val, image_dataset):
    results = position_probe(toy, ImageFolder(imagenet_val), DatasetImages(image_dataset, name="held out"), epochs=1,
                             tokens_per_image=None, progress=False)  # every token  # fmt: skip
    provenance = results.attrs["provenance"]
    assert provenance["train_images"]["count"] == 6 and provenance["test_images"]["dataset"] == "held out"
    assert provenance["model"]["name"] == "toy-llava" and provenance["epochs"] == 1
    assert (results["n_test"] == 5 * 64).all()  # toy-llava: 8x8 image tokens


def test_the_probes_train_on_one_batch_of_tokens_at_a_time(toy, imagenet_val, monkeypatch):
    monkeypatch.setattr(sys.modules["hooked_vlm.experiments.position_probe"], "KEEP_ACTIVATIONS_BYTES", 0)  # as on ImageNet
    sizes, forwards = [], []
    train_on, run_with_cache = SiteProbe.train_on, toy.run_with_cache
    monkeypatch.setattr(SiteProbe, "train_on", lambda self, x, y, g: sizes.append(len(y)) or train_on(self, x, y, g))
    monkeypatch.setattr(toy, "run_with_cache", lambda inputs, **k: forwards.append(len(inputs.input_ids)) or run_with_cache(inputs, **k))
    results = position_probe(toy, ImageFolder(imagenet_val), ImageFolder(imagenet_val), epochs=2, batch_size=2,
                             tokens_per_image=None, progress=False)  # fmt: skip
    assert max(sizes) == 2 * 64 and len(sizes) == 2 * 3 * len(set(results["hook"]))  # epochs x batches x sites
    assert sum(forwards) == 6 * (1 + 2 + 1)  # standardisation, two epochs, scoring: the images are read again
    with pytest.raises(TypeError, match="one-shot iterator"):
        position_probe(toy, iter(ImageFolder(imagenet_val)), ImageFolder(imagenet_val), progress=False)


def test_a_small_training_set_kept_in_memory_gives_the_streamed_result(toy, imagenet_val, monkeypatch):
    probe = sys.modules["hooked_vlm.experiments.position_probe"]
    kept = position_probe(toy, ImageFolder(imagenet_val), ImageFolder(imagenet_val), epochs=2, tokens_per_image=5, progress=False)
    monkeypatch.setattr(probe, "KEEP_ACTIVATIONS_BYTES", 0)
    streamed = position_probe(toy, ImageFolder(imagenet_val), ImageFolder(imagenet_val), epochs=2, tokens_per_image=5, progress=False)
    pd.testing.assert_frame_equal(kept, streamed)


def test_the_mean_embedding_command_reads_a_folder(imagenet_val, tmp_path, capsys):
    out = tmp_path / "mean.pt"
    assert main(["mean-embedding", "--model", "toy-llava", "--collection", str(imagenet_val), "--limit", "4", "--out", str(out)]) == 0
    assert iv.load_mean(out).provenance["images"]["count"] == 4 and "of 4 images" in capsys.readouterr().out


def test_the_probe_command_trains_and_scores_on_a_collection(imagenet_val, tmp_path):
    out = tmp_path / "probe"
    assert main(["position-probe", "--model", "toy-llava", "--collection", str(imagenet_val), "--n-train", "4", "--n-test", "2",
                 "--epochs", "1", "--out", str(out)]) == 0  # fmt: skip
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["train_images"]["count"] == 4 and provenance["test_images"]["count"] == 2
