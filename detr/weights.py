"""The published DETR checkpoints, each with everything needed to use it.

In the manner of torchvision's ``Weights`` enums: an entry carries where the file comes from, how
it is verified, the architecture it needs (dilation included: a DC5 model is not told apart by
its tensors), its class table and the input size it was trained at. :func:`detr.from_pretrained`
and the jobs read the architecture from here instead of guessing it from a file name; a file
that is not in the registry carries its own config (``save_pretrained``) or is read off its
tensors, without dilation unless the caller says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .categories import COCO_CATEGORIES, Category
from .config import MAX_SIZE, MIN_SIZE, DetrConfig

_FB = "https://dl.fbaipublicfiles.com/detr"


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint.

    Args:
        name: the short name users pass (``--weights detr-r50``).
        source: where it is fetched from: an ``https://`` URL, or ``hf://ORG/REPO`` for the hub's
            ``model.safetensors`` (resolved against ``$HF_ENDPOINT``).
        sha256_prefix: the SHA-256 prefix the official file name carries; None where the hub
            vouches for each download instead.
        config: the architecture the weights need.
        categories: class index -> dataset category (COCO's 91-id table).
        min_size, max_size: the shortest/longest side it was trained and evaluated at.
        coco_box_ap: published box AP on COCO val2017 (the DETR paper's model zoo).
    """

    name: str
    source: str
    sha256_prefix: str | None
    config: DetrConfig
    categories: tuple[Category, ...] = COCO_CATEGORIES
    min_size: int = MIN_SIZE
    max_size: int = MAX_SIZE
    coco_box_ap: float | None = field(default=None, compare=False)

    @property
    def file_name(self) -> str:
        """The file name the official download has (``detr-r50-e632da11.pth``)."""
        return PurePosixPath(self.source).name


_R50 = DetrConfig(backbone="resnet50")
_R50_DC5 = DetrConfig(backbone="resnet50", dilation=True)
_R101 = DetrConfig(backbone="resnet101")
_R101_DC5 = DetrConfig(backbone="resnet101", dilation=True)

REGISTRY: dict[str, PretrainedWeights] = {
    w.name: w
    for w in (
        PretrainedWeights("detr-r50", f"{_FB}/detr-r50-e632da11.pth", "e632da11", _R50, coco_box_ap=42.0),
        PretrainedWeights("detr-r50-dc5", f"{_FB}/detr-r50-dc5-f0fb7ef5.pth", "f0fb7ef5", _R50_DC5, coco_box_ap=43.3),
        PretrainedWeights("detr-r101", f"{_FB}/detr-r101-2c7b67e5.pth", "2c7b67e5", _R101, coco_box_ap=43.5),
        PretrainedWeights(
            "detr-r101-dc5", f"{_FB}/detr-r101-dc5-a2e86def.pth", "a2e86def", _R101_DC5, coco_box_ap=44.9
        ),
        PretrainedWeights("hf://facebook/detr-resnet-50", "hf://facebook/detr-resnet-50", None, _R50, coco_box_ap=42.0),
        PretrainedWeights(
            "hf://facebook/detr-resnet-50-dc5", "hf://facebook/detr-resnet-50-dc5", None, _R50_DC5, coco_box_ap=43.3
        ),
        PretrainedWeights(
            "hf://facebook/detr-resnet-101", "hf://facebook/detr-resnet-101", None, _R101, coco_box_ap=43.5
        ),
        PretrainedWeights(
            "hf://facebook/detr-resnet-101-dc5", "hf://facebook/detr-resnet-101-dc5", None, _R101_DC5, coco_box_ap=44.9
        ),
    )
}
SHORT_NAMES = tuple(name for name in REGISTRY if "://" not in name)


def registered(source: str) -> PretrainedWeights | None:
    """The entry ``source`` names: a short name, an ``hf://`` repo or an entry's download URL."""
    source = source.rstrip("/")
    if source in REGISTRY:
        return REGISTRY[source]
    return next((w for w in REGISTRY.values() if w.source == source), None)


def identified_by_sha256(sha256: str) -> PretrainedWeights | None:
    """The official file whose published checksum prefix ``sha256`` (a file's full hex digest) has:
    a copy downloaded elsewhere and passed as a local path is known by its content, not its name."""
    return next((w for w in REGISTRY.values() if w.sha256_prefix and sha256.startswith(w.sha256_prefix)), None)
