"""Category tables: which category id and name each class index of a model stands for.

A DETR class head has ``num_classes + 1`` logits; the last is "no object". Index ``i`` of the
others maps to a :class:`Category`. The COCO weights use the 91-id COCO table directly
(class index == category id, with ``N/A`` in the gaps the 2017 release left unused);
fine-tuned weights carry their own table, built from the training annotations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

NO_CATEGORY = "N/A"


@dataclass(frozen=True)
class Category:
    id: int
    name: str


# The 91 entries DETR's COCO head is trained on; index == COCO category id.
_COCO_NAMES = (
    "N/A",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

COCO_CATEGORIES: tuple[Category, ...] = tuple(Category(i, n) for i, n in enumerate(_COCO_NAMES))


def categories_from_coco(coco_categories: Iterable[Mapping]) -> tuple[Category, ...]:
    """Contiguous class table from a COCO ``categories`` list, ordered by id.

    Args:
        coco_categories: the ``categories`` entries of a COCO instances file
            (each with integer ``id`` and string ``name``).
    Returns:
        One :class:`Category` per class index ``0..K-1``.
    """
    table = sorted((int(c["id"]), str(c["name"])) for c in coco_categories)
    ids = [i for i, _ in table]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids in {ids}")
    return tuple(Category(i, n) for i, n in table)


def categories_to_list(categories: Sequence[Category]) -> list[dict]:
    """Serializable form stored in checkpoints: ``[{"id": int, "name": str}, ...]``."""
    return [{"id": c.id, "name": c.name} for c in categories]


def categories_from_list(entries: Sequence[Mapping]) -> tuple[Category, ...]:
    """Inverse of :func:`categories_to_list` (order is the class index)."""
    return tuple(Category(int(e["id"]), str(e["name"])) for e in entries)
