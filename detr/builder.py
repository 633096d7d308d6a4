"""Assembling a trainable DETR: the model, its matcher and its criterion from two configs.

DETR's ``build()`` idea without its argparse namespace: the caller passes typed configs and gets
parts that agree on the class count and the loss recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

from .categories import Category
from .config import DetrConfig, LossConfig
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .model import DETR


def build_criterion(num_classes: int, loss: LossConfig = LossConfig()) -> SetCriterion:
    """The set criterion (with its Hungarian matcher) for a head of ``num_classes`` classes."""
    matcher = HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou)
    return SetCriterion(num_classes, matcher, loss.eos_coef)


def build(
    config: DetrConfig, loss: LossConfig = LossConfig(), categories: Sequence[Category] | None = None
) -> tuple[DETR, SetCriterion]:
    """A randomly initialized DETR and the criterion that trains it."""
    return DETR(config, categories), build_criterion(config.num_classes, loss)
