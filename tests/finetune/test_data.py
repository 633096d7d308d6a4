"""jobs/finetune/data.py: COCO instances files and images from any fsspec URI into training samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from coco import CocoFormatError
from jobs.finetune.data import CocoDetectionDataset, read_training_set
from jobs.synthetic_shapes import generate


def write_coco(path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def small_document() -> dict:
    return {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 9, "file_name": "b.png", "height": 40, "width": 60},  # no annotations: a negative
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 42, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [50, 30, 30, 30]},  # clipped to 10 x 10
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [0, 0, 60, 40], "iscrowd": 1},  # crowd: ignored
            {"id": 4, "image_id": 7, "category_id": 42, "bbox": [20, 20, 0, 5]},  # no width: dropped
            {"id": 5, "image_id": 7, "category_id": 42, "bbox": [70, 10, 5, 5]},  # outside the image: dropped
        ],
        "categories": [{"id": 42, "name": "cat"}, {"id": 5, "name": "dog"}],
    }


def test_arbitrary_ids_become_contiguous_classes_crowd_and_empty_boxes_left_out(tmp_path):
    parsed = read_training_set(write_coco(tmp_path / "a.json", small_document()))

    assert [(c.id, c.name) for c in parsed.categories] == [(5, "dog"), (42, "cat")]
    first, negative = parsed.images
    assert first.labels.tolist() == [1, 0]  # cat (id 42) -> 1, dog (id 5) -> 0
    np.testing.assert_allclose(first.boxes_xyxy, [[10, 5, 30, 15], [50, 30, 60, 40]])
    assert negative.labels.shape == (0,) and negative.boxes_xyxy.shape == (0, 4)
    assert (parsed.num_crowd, parsed.num_degenerate, parsed.num_boxes) == (1, 2, 2)
    assert len(parsed.instances.boxes.annotation_ids) == 5  # evaluation sees the file as written


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.pop("annotations"), "missing the 'annotations' list"),
        (lambda d: d["annotations"][0].update(category_id=99), "category_id 99, which is not in categories"),
        (lambda d: d["annotations"][0].update(image_id=3), "image_id 3, which is not in images"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "expected 4 finite numbers"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotations[0] (id 1) lacks ['bbox']"),
        (lambda d: d["images"].append(dict(d["images"][0])), "repeats image id 7"),
        (lambda d: d["images"][0].update(height=0), "bad size 0x60"),
        (lambda d: d.update(categories=[]), "has no categories"),
        (lambda d: d["categories"].append({"id": 5, "name": "again"}), "duplicate category ids"),
    ],
)
def test_malformed_file_names_file_and_reason(tmp_path, mutate, reason):
    document = small_document()
    mutate(document)
    path = write_coco(tmp_path / "bad.json", document)
    with pytest.raises(CocoFormatError) as error:
        read_training_set(path)
    assert str(error.value).startswith(f"{path}: ") and reason in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_files(tmp_path):
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        read_training_set(str(tmp_path / "text.json"))
    with pytest.raises(CocoFormatError, match="no such file"):
        read_training_set(str(tmp_path / "missing.json"))
    with pytest.raises(CocoFormatError, match="expected a JSON object"):
        read_training_set(write_coco(tmp_path / "list.json", []))


def test_items_from_object_storage(s3_bucket):
    coco = generate(f"s3://{s3_bucket}/shapes", 4, seed=2)
    parsed = read_training_set(f"s3://{s3_bucket}/shapes/annotations.json")
    dataset = CocoDetectionDataset(f"s3://{s3_bucket}/shapes/images", parsed)

    assert len(dataset) == 4
    for index, image_entry in enumerate(coco["images"]):
        image, target = dataset[index]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, image_entry["height"], image_entry["width"])
        expected = [a for a in coco["annotations"] if a["image_id"] == image_entry["id"]]
        assert target["image_id"] == image_entry["id"] and target["orig_size"] == (
            image_entry["height"],
            image_entry["width"],
        )
        assert target["labels"].tolist() == [[10, 20, 30].index(a["category_id"]) for a in expected]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in expected)]
        np.testing.assert_allclose(target["boxes"].reshape(-1, 4).numpy(), np.asarray(xyxy).reshape(-1, 4))


def test_bad_images_name_the_file(tmp_path):
    document = small_document()
    annotations = read_training_set(write_coco(tmp_path / "a.json", document))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (30, 40)).save(tmp_path / "images" / "a.png")  # 40 x 30, the file says 40 x 60
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    dataset = CocoDetectionDataset(str(tmp_path / "images"), annotations)
    with pytest.raises(CocoFormatError, match=r"a\.png: image is 40x30 but .*a\.json says 40x60"):
        dataset[0]
    with pytest.raises(CocoFormatError, match=r"b\.png: not a decodable image"):
        dataset[1]


def test_real_coco_subset(coco_mini):
    annotations_uri = str(coco_mini / "annotations" / "instances_val2017.json")
    document = json.loads(open(annotations_uri).read())
    parsed = read_training_set(annotations_uri)

    assert len(parsed.categories) == len(document["categories"])
    assert parsed.num_crowd == sum(a["iscrowd"] for a in document["annotations"])
    assert parsed.num_boxes + parsed.num_crowd + parsed.num_degenerate == len(document["annotations"])
    image, target = CocoDetectionDataset(str(coco_mini / "val2017"), parsed)[0]
    assert tuple(image.shape[1:]) == target["orig_size"]


def one_image_dataset(tmp_path, file_name: str, height: int, width: int, bbox: list[float]) -> CocoDetectionDataset:
    """A dataset of the one image ``images/<file_name>`` (written by the test), annotated with one box."""
    document = {
        "images": [{"id": 1, "file_name": file_name, "height": height, "width": width}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": bbox}],
        "categories": [{"id": 3, "name": "thing"}],
    }
    annotations = read_training_set(write_coco(tmp_path / "instances.json", document))
    return CocoDetectionDataset(str(tmp_path / "images"), annotations)


def write_exif_rotated_jpeg(path) -> None:
    """A landscape 48 x 32 (W x H) JPEG with EXIF Orientation 6: viewers show it rotated 90
    degrees clockwise, as a 32 x 48 portrait. A white 24 x 16 block fills the stored top-left
    corner, which lands in the upright image's top-right corner: x 16..32, y 0..24."""
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:16, :24] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(stored).save(path, exif=exif, quality=95)


def test_exif_rotated_jpeg_is_upright_and_matches_its_boxes(tmp_path):
    write_exif_rotated_jpeg(tmp_path / "images" / "rotated.jpg")
    dataset = one_image_dataset(tmp_path, "rotated.jpg", height=48, width=32, bbox=[16, 0, 16, 24])

    image, target = dataset[0]

    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 48, 32)
    with Image.open(tmp_path / "images" / "rotated.jpg") as stored:
        upright = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), upright)
    assert target["orig_size"] == (48, 32) and tuple(target["boxes"].canvas_size) == (48, 32)
    np.testing.assert_allclose(target["boxes"].numpy(), [[16, 0, 32, 24]])
    x0, y0, x1, y1 = (int(v) for v in target["boxes"][0])
    inside = image[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].float()
    outside = image[:, y1 + 2 :, :].float()
    assert inside.min() > 200 and outside.max() < 50  # the object is where the box says


def test_annotations_on_the_stored_pixels_of_a_rotated_jpeg_are_refused_with_a_hint(tmp_path):
    write_exif_rotated_jpeg(tmp_path / "images" / "rotated.jpg")
    dataset = one_image_dataset(tmp_path, "rotated.jpg", height=32, width=48, bbox=[0, 0, 24, 16])

    with pytest.raises(CocoFormatError) as error:
        dataset[0]

    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'images' / 'rotated.jpg'}: image is 48x32 but ")
    assert "instances.json says 32x48" in message and "EXIF orientation" in message and "\n" not in message


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    (tmp_path / "images").mkdir()
    Image.fromarray(gray, mode="L").save(tmp_path / "images" / "gray.png")

    image, _ = one_image_dataset(tmp_path, "gray.png", height=20, width=30, bbox=[1, 1, 5, 5])[0]

    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 20, 30)
    for channel in image:
        np.testing.assert_array_equal(channel.numpy(), gray)


def test_rgba_png_becomes_rgb_over_white(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = (10, 20, 30, 255)  # left half opaque, right half fully transparent
    (tmp_path / "images").mkdir()
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "images" / "alpha.png")

    image, _ = one_image_dataset(tmp_path, "alpha.png", height=20, width=30, bbox=[1, 1, 5, 5])[0]

    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 20, 30)
    assert (image[:, :, :15] == torch.tensor([10, 20, 30], dtype=torch.uint8)[:, None, None]).all()
    assert (image[:, :, 15:] == 255).all()


def test_corrupt_image_is_one_line_naming_the_uri_and_reason(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), "red").save(tmp_path / "images" / "whole.jpg")
    data = (tmp_path / "images" / "whole.jpg").read_bytes()
    (tmp_path / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])

    with pytest.raises(CocoFormatError) as error:
        one_image_dataset(tmp_path, "cut.jpg", height=48, width=64, bbox=[1, 1, 5, 5])[0]

    assert str(error.value) == f"{tmp_path / 'images' / 'cut.jpg'}: not a decodable image (truncated JPEG)"
