"""The typed configuration of a DETR model. Builders take it explicitly; nothing mutates it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


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
    def from_dict(cls, values: Mapping[str, Any]) -> "DetrConfig":
        """Build from a stored dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DetrConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)
