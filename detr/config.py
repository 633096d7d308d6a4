"""The typed configuration of a DETR model, its input size and precisions.

Builders take it explicitly; nothing mutates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
MIN_SIZE = 800  # DETR's evaluation scale: shortest side
MAX_SIZE = 1333  # ... unless that makes the longest side exceed this
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of a forward pass: detr.precision says what each means


@dataclass(frozen=True)
class DetrConfig:
    backbone: str = "resnet50"  # torchvision ResNet trunk; resnet18/34 only for small tests and toys
    dilation: bool = False  # DC5: replace the stride of the last stage by dilation (stride 16 features)
    hidden_dim: int = 256  # d_model of the transformer
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1  # only active in training mode
    num_queries: int = 100  # object slots; the most detections one image can get
    num_classes: int = 91  # class logits before the extra "no object" one (COCO: ids 0..90)
    position_temperature: float = 10000.0  # sine position encoding's wavelength base

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), got {self.backbone!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even for the 2-D sine encoding, got {self.hidden_dim}")
        for name in ("num_decoder_layers", "num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def backbone_channels(self) -> int:
        """Channels of the last ResNet stage (C5)."""
        return 512 if self.backbone in ("resnet18", "resnet34") else 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DetrConfig:
        """Build from a stored dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DetrConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class LossConfig:
    """DETR's set-prediction loss: matching costs, loss weights and the no-object weight.

    Defaults are the DETR paper's (and transformers' ``DetrConfig``): class 1, L1 box 5, GIoU 2
    for both matching and the loss. Auxiliary decoder layers reuse their base term's weight.
    """

    cost_class: float = 1.0  # matching: weight of -p(class)
    cost_bbox: float = 5.0  # matching: weight of L1 between normalized cxcywh boxes
    cost_giou: float = 2.0  # matching: weight of -GIoU
    loss_ce: float = 1.0  # loss: cross entropy over K + 1 classes
    loss_bbox: float = 5.0  # loss: L1 of matched boxes
    loss_giou: float = 2.0  # loss: 1 - GIoU of matched boxes
    eos_coef: float = 0.1  # cross-entropy weight of "no object" relative to the classes

    def __post_init__(self) -> None:
        if min(self.cost_class, self.cost_bbox, self.cost_giou, self.loss_ce, self.loss_bbox, self.loss_giou) < 0:
            raise ValueError(f"loss and cost weights must not be negative, got {self}")
        if self.eos_coef <= 0:  # 0 would make a batch without any match a 0/0 cross entropy
            raise ValueError(f"eos_coef must be positive, got {self.eos_coef}")

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight per loss term name, as :func:`detr.criterion.weighted_total` takes them."""
        return {"loss_ce": self.loss_ce, "loss_bbox": self.loss_bbox, "loss_giou": self.loss_giou}
