"""jobs/detection_transforms.py: DETR's augmentation moves boxes with the pixels; evaluation resize = detr's."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert

import detr
from jobs.finetune.data import CocoDetectionDataset, read_training_set
from jobs.finetune.transforms import (
    AugmentationConfig,
    RandomSizeCrop,
    ResizeShortestSide,
    eval_transform,
    to_model_target,
    train_transform,
)
from jobs.synthetic_shapes import SHAPE_CLASSES, ShapesConfig, generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(str(root), 12, seed=4, config=ShapesConfig(image_size=160, max_overlap_iou=0.0))
    return str(root / "images"), read_training_set(str(root / "annotations.json"))


def sample(height: int, width: int, boxes_xyxy: list[list[float]], labels: list[int]):
    image = tv_tensors.Image(torch.randint(0, 255, (3, height, width), dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": 1,
        "orig_size": (height, width),
    }
    return image, target


def test_scaled_recipe_is_detrs_at_800_and_shrinks_proportionally():
    assert AugmentationConfig.scaled(800, 1333) == AugmentationConfig()
    assert AugmentationConfig().scales == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert (
        AugmentationConfig().crop_scales,
        AugmentationConfig().crop_min_size,
        AugmentationConfig().crop_max_size,
    ) == ((400, 500, 600), 384, 600)
    small = AugmentationConfig.scaled(160, 267)
    assert small.scales[0] == 96 and small.scales[-1] == 160 and small.crop_scales == (80, 100, 120)
    assert (small.crop_min_size, small.crop_max_size, small.eval_size, small.max_size) == (77, 120, 160, 267)


def test_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="augmentation must be one of"):
        AugmentationConfig(augmentation="mosaic")
    with pytest.raises(ValueError, match="max_size=100"):
        AugmentationConfig(max_size=100)
    with pytest.raises(ValueError, match="min_size=900, max_size=800"):
        AugmentationConfig.scaled(900, 800)


def test_eval_resize_equals_detr_resize_image_and_boxes_are_normalized_cxcywh():
    image, target = sample(300, 450, [[45, 30, 90, 150]], [2])
    config = AugmentationConfig.scaled(200, 320)
    out, out_target = eval_transform(config)(image, target)

    expected = detr.resize_image(image.as_subclass(torch.Tensor), 200, 320)
    assert type(out) is torch.Tensor and torch.equal(out, expected)
    assert out_target["size"] == tuple(expected.shape[1:]) and out_target["orig_size"] == (300, 450)
    # Normalized coordinates do not change under a pure resize.
    expected_box = box_convert(torch.tensor([[45.0, 30, 90, 150]]), "xyxy", "cxcywh") / torch.tensor(
        [450, 300, 450, 300]
    )
    torch.testing.assert_close(out_target["boxes"], expected_box, atol=2e-3, rtol=0)
    assert out_target["labels"].tolist() == [2]


def test_multi_scale_sizes_come_from_the_configured_scales_and_respect_max_size():
    resize = ResizeShortestSide((100, 120, 140), max_size=180)
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        image, _ = resize(*sample(90, 300, [[0, 0, 10, 10]], [0]))
        height, width = image.shape[1:]
        assert max(height, width) <= 180
        seen.add((height, width))
    # Wide image: the max-size rule caps every scale at the same shape.
    assert seen == {detr.resized_shape(90, 300, 100, 180)}
    torch.manual_seed(0)
    shapes = {tuple(resize(*sample(200, 200, [[0, 0, 10, 10]], [0]))[0].shape[1:]) for _ in range(30)}
    assert shapes == {(100, 100), (120, 120), (140, 140)}


def test_crop_removes_boxes_it_leaves_empty_with_their_labels():
    crop = RandomSizeCrop(50, 50)
    # Either resize to 50 (both boxes kept) or crop 50 x 50, which cannot hold area of both corner boxes.
    transform = train_transform(
        AugmentationConfig(
            scales=(50,), max_size=200, crop_scales=(100,), crop_min_size=50, crop_max_size=50, eval_size=100
        )
    )
    torch.manual_seed(0)
    kept_any = dropped_any = False
    for _ in range(40):
        image, target = sample(100, 100, [[0, 0, 20, 20], [70, 70, 100, 100]], [0, 1])
        params = crop.make_params([image])
        _, out_target = transform(image, target)
        assert len(out_target["labels"]) == len(out_target["boxes"])
        boxes = out_target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        kept_any |= len(boxes) == 2
        dropped_any |= len(boxes) < 2
        assert params["height"] == params["width"] == 50
    assert kept_any and dropped_any


@pytest.mark.parametrize("augmentation", ["detr", "scale", "none"])
def test_augmented_boxes_still_frame_shapes_of_their_class(shapes, augmentation):
    """The colour under each transformed box is its class colour: flips, resizes and crops moved boxes with pixels."""
    images, annotations = shapes
    config = AugmentationConfig.scaled(128, 213, augmentation)
    dataset = CocoDetectionDataset(images, annotations, train_transform(config))
    colours = torch.tensor([c.rgb for c in SHAPE_CLASSES], dtype=torch.float32)  # class index order = id order
    torch.manual_seed(1)
    checked = 0
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            height, width = image.shape[1:]
            assert image.dtype == torch.uint8 and max(height, width) <= config.max_size
            corners = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([width, height, width, height])
            for (x0, y0, x1, y1), label in zip(corners.tolist(), target["labels"].tolist()):
                if min(x1 - x0, y1 - y0) < 8:  # a sliver left by a crop: too thin to sample reliably
                    continue
                pixel = image[:, int(y0 + (y1 - y0) * 0.7), int((x0 + x1) / 2)].float()
                assert int((colours - pixel).abs().sum(1).argmin()) == label
                checked += 1
    assert checked > 20


def test_final_step_outputs_plain_tensors():
    image, target = sample(40, 80, [[8, 4, 24, 36]], [1])
    out, out_target = to_model_target(image, target)
    assert type(out) is torch.Tensor and type(out_target["boxes"]) is torch.Tensor
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.2, 0.5, 0.2, 0.8]]))
