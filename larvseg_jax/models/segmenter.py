"""ViT backbone + cosine head: the one model that training, evaluation and `segment` apply."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from larvseg_jax.models.head import CosineHead
from larvseg_jax.models.vit import ViT


class Segmenter(nn.Module):
    """Images -> mask-normed logits over the classes `cls_index` selects from the union table."""

    backbone: ViT
    num_classes: int  # C_union, rows of the class embedding table
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        cls_index: jax.Array,
        class_mask: jax.Array | None = None,
        *,
        train: bool,
    ) -> tuple[jax.Array, dict]:
        """images [B, H, W, 3] -> logits [B, h, w, N] and aux {"score", "embed"} (SPEC 1.3)."""
        features = self.backbone(images, train=train)
        head = CosineHead(self.num_classes, self.dtype, self.backbone.gemm, name="head")
        return head(features, cls_index, class_mask)
