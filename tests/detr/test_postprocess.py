"""Post-processing against transformers' post_process_object_detection, end to end on real photos."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import detr

pytest.importorskip("transformers")
from transformers import DetrImageProcessor  # noqa: E402
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput  # noqa: E402


def _random_outputs(batch: int = 3, queries: int = 100, classes: int = 92, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": 3 * torch.randn(batch, queries, classes, generator=generator),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25,
    }


def test_matches_post_process_object_detection():
    outputs = _random_outputs()
    sizes = torch.tensor([[480, 640], [1000, 300], [50, 70]])
    reference = DetrImageProcessor().post_process_object_detection(
        DetrObjectDetectionOutput(logits=outputs["pred_logits"], pred_boxes=outputs["pred_boxes"]),
        threshold=0.3,
        target_sizes=sizes,
    )
    ours = detr.postprocess(outputs, sizes, threshold=0.3)
    for expected, got in zip(reference, ours):
        assert len(got["scores"]) > 0
        torch.testing.assert_close(got["scores"], expected["scores"])
        assert torch.equal(got["labels"], expected["labels"])
        torch.testing.assert_close(got["boxes"], expected["boxes"])


def test_records_carry_category_ids_and_names_best_first():
    outputs = _random_outputs(batch=1, classes=4)
    categories = [detr.Category(10, "square"), detr.Category(20, "circle"), detr.Category(30, "triangle")]
    result = detr.postprocess(outputs, torch.tensor([[100, 200]]), threshold=0.2)[0]
    records = detr.detection_records(result, categories)
    assert records and [r["score"] for r in records] == sorted((r["score"] for r in records), reverse=True)
    by_id = {c.id: c.name for c in categories}
    assert all(by_id[r["category_id"]] == r["label"] for r in records)
    assert all(r["box"][0] <= r["box"][2] and r["box"][1] <= r["box"][3] for r in records)
    assert max(r["box"][2] for r in records) > 100, "boxes are in pixels of the 200-wide image, not normalized"


def test_end_to_end_equals_transformers_on_real_photos(coco_mini, reference_r50):
    reference, hub_file, _ = reference_r50
    model = detr.from_pretrained(str(hub_file))
    images = [Image.open(f).convert("RGB") for f in sorted((coco_mini / "val2017").glob("*.jpg"))[:2]]
    processor = DetrImageProcessor(size={"shortest_edge": 320, "longest_edge": 480})
    inputs = processor(images=images, return_tensors="pt")
    sizes = torch.tensor([[im.height, im.width] for im in images])
    with torch.inference_mode():
        expected = processor.post_process_object_detection(reference(**inputs), threshold=0.01, target_sizes=sizes)
        batch = detr.preprocess(images, min_size=320, max_size=480)
        ours = detr.postprocess(model(batch.pixel_values, batch.pixel_mask), batch.original_sizes, threshold=0.01)
    for e, o in zip(expected, ours):
        assert torch.equal(o["labels"], e["labels"])
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-2, rtol=0)  # pixels


def test_bad_arguments():
    outputs = _random_outputs(batch=2)
    with pytest.raises(ValueError, match=r"original_sizes must be \[2, 2\]"):
        detr.postprocess(outputs, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="threshold must be in"):
        detr.postprocess(outputs, torch.tensor([[1, 2], [3, 4]]), threshold=1.5)
