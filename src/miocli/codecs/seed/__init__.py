"""SEED-Tokenizer-2, MIO's image tokenizer: our own EVA-ViT-g + causal Q-Former + VQ codec."""

from .layout import HeadCounts, SeedDims
from .model import SeedCodec, SeedTrace

__all__ = ["HeadCounts", "SeedCodec", "SeedDims", "SeedTrace"]
