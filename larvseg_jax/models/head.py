"""Cosine pixel classifier with "mask norm" (SPEC 1.3): the only decode layer LarvSeg uses."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MASK_NORM_EPS = 1e-5


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, as torch's `x / x.norm(dim=-1, keepdim=True)` (no epsilon in the official head)."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def mask_norm(scores: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
    """Per-pixel z-score over the class axis (last), population variance, eps 1e-5."""
    mean = jnp.mean(scores, axis=-1, keepdims=True)
    var = jnp.var(scores, axis=-1, keepdims=True)
    return gamma * (scores - mean) / jnp.sqrt(var + MASK_NORM_EPS) + beta


class CosineHead(nn.Module):
    """Projects pixels and class embeddings, scores them by cosine, standardises per pixel.

    Attributes:
      num_classes: rows of the union vocabulary table E (C_union).
      dtype: compute dtype of the two projections.
    """

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, cls_index: jax.Array) -> tuple[jax.Array, dict]:
        """Scores every pixel against the classes of the current vocabulary.

        Args:
          features: [B, h, w, D] backbone output.
          cls_index: [N] int rows of the union table that form the current vocabulary.

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

        x = l2_normalize(features.astype(self.dtype) @ patch_proj.astype(self.dtype))
        e = l2_normalize(cls_emb[cls_index].astype(self.dtype) @ class_proj.astype(self.dtype))
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)  # scores never below fp32
        scores = jnp.einsum("bhwd,nd->bhwn", x, e).astype(out_dtype)
        logits = mask_norm(scores, gamma, beta)
        aux = {
            "score": jax.lax.stop_gradient(scores),
            "embed": jax.lax.stop_gradient(x.astype(out_dtype)),
        }
        return logits, aux
