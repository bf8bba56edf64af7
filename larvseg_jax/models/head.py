"""Cosine pixel classifier with "mask norm" (SPEC 1.3): the only decode layer LarvSeg uses."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from larvseg_jax.models import matmul

MASK_NORM_EPS = 1e-5


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, as torch's `x / x.norm(dim=-1, keepdim=True)` (no epsilon in the official head)."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def mask_norm(
    scores: jax.Array, gamma: jax.Array, beta: jax.Array, class_mask: jax.Array | None = None
) -> jax.Array:
    """Per-pixel z-score over the class axis (last), population variance, eps 1e-5.

    `class_mask` [N] excludes padding columns of a sampled vocabulary from the statistics.
    """
    if class_mask is None:
        mean = jnp.mean(scores, axis=-1, keepdims=True)
        var = jnp.var(scores, axis=-1, keepdims=True)
    else:
        count = jnp.sum(class_mask)
        mean = jnp.sum(jnp.where(class_mask, scores, 0.0), -1, keepdims=True) / count
        var = jnp.sum(jnp.where(class_mask, (scores - mean) ** 2, 0.0), -1, keepdims=True) / count
    z = gamma * (scores - mean) / jnp.sqrt(var + MASK_NORM_EPS) + beta
    return z if class_mask is None else jnp.where(class_mask, z, 0.0)


class CosineHead(nn.Module):
    """Projects pixels and class embeddings, scores them by cosine, standardises per pixel.

    Attributes:
      num_classes: rows of the union vocabulary table E (C_union).
      dtype: compute dtype of the two projections.
      gemm: their GEMM implementation (matmul.GEMM_IMPLEMENTATIONS).
    """

    num_classes: int
    dtype: Any = jnp.float32
    gemm: str = "auto"  # matmul.GEMM_IMPLEMENTATIONS

    @nn.compact
    def __call__(
        self, features: jax.Array, cls_index: jax.Array, class_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """Scores every pixel against the classes of the current vocabulary.

        Args:
          features: [B, h, w, D] backbone output.
          cls_index: [N] int rows of the union table that form the current vocabulary.
          class_mask: [N] bool, False for padding columns of a sampled vocabulary (SPEC 2.6).

        Returns:
          logits [B, h, w, N] mask-normed scores, and aux with "score" [B, h, w, N] (raw cosine)
          and "embed" [B, h, w, D] (unit pixel embeddings), both under stop_gradient.
        """
        d = features.shape[-1]
        proj_init = nn.initializers.normal(stddev=d**-0.5)  # N(0,1) * D^-0.5
        patch_proj = self.param("proj_patch", proj_init, (d, d))
        class_proj = self.param("proj_classes", proj_init, (d, d))
        # SPEC D2: torch's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. a plain normal.
        cls_emb = self.param("cls_emb", nn.initializers.normal(stddev=0.02), (self.num_classes, d))
        gamma = self.param("gamma", nn.initializers.ones, ())
        beta = self.param("beta", nn.initializers.zeros, ())

        x = features.astype(self.dtype)
        x = l2_normalize(matmul.dense(x, patch_proj.astype(self.dtype), gemm=self.gemm))
        e = cls_emb[cls_index].astype(self.dtype)
        e = l2_normalize(matmul.dense(e, class_proj.astype(self.dtype), gemm=self.gemm))
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)  # scores never below fp32
        scores = matmul.einsum("bhwd,nd->bhwn", x, e, out_dtype=out_dtype)
        logits = mask_norm(scores, gamma, beta, class_mask)
        aux = {
            "score": jax.lax.stop_gradient(scores),
            "embed": jax.lax.stop_gradient(x.astype(out_dtype)),
        }
        return logits, aux
