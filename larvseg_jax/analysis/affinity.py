"""Pixel embeddings at input resolution and their cosine response to seed pixels (SPEC 9).

The oracle (Table 1) and the response maps (Fig. 2) both look at the head's stop-grad,
projected, unit-norm pixel features `embed` (SPEC 1.3), bilinearly upsampled from the feature
grid to the network's input size (the resized ground truth's size) and L2-normalised again per
pixel (SPEC 9 steps 1-2); a pixel's response to a class is its cosine to that class's seed
pixel, the maximum over seeds when there are several (step 5).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from larvseg_jax import interp
from larvseg_jax.inference import Predictor
from larvseg_jax.models.head import l2_normalize


def upsample_unit(embed: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """[h, w, D] unit features -> [H, W, D] unit features: bilinear (align_corners=False, as the
    official `resize`), then renormalised, since interpolating unit vectors shortens them."""
    return l2_normalize(interp.resize_bilinear(embed, hw))


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(params, index, image, *, model):
    _, aux = model.apply({"params": params}, image[None], index, train=False)
    return upsample_unit(aux["embed"][0].astype(jnp.float32), image.shape[:2])


def embedding_fn(predictor: Predictor) -> Callable[[np.ndarray], jax.Array]:
    """image float32 [H, W, 3] (resized, normalised) -> unit embeddings [H, W, D] on the
    predictor's device: one whole-image forward (SPEC 7.2 whole mode, as the oracle's test
    config). Compiled once per image shape and model (a module-level jit: every command and
    predictor of the same model shares the programs)."""
    device = predictor.device
    params = jax.device_put(predictor.params, device)
    # The head also scores classes; any vocabulary will do, the embeddings do not depend on it.
    index = jax.device_put(predictor.index(predictor.default_names), device)

    def embed(image: np.ndarray) -> jax.Array:
        image = jax.device_put(np.asarray(image, np.float32), device)
        return _embed(params, index, image, model=predictor.model)

    return embed


@jax.jit
def seed_responses(embed: jax.Array, seeds: jax.Array) -> jax.Array:
    """Cosine of every pixel to its nearest seed of each class (SPEC 9 step 5).

    Args:
      embed: [H, W, D] unit embeddings.
      seeds: int32 [K, N] flat pixel indices (row-major) of N seeds for each of K classes; a
        class with fewer seeds repeats one (the maximum is unchanged).

    Returns:
      float32 [H, W, K], in [-1, 1]; 1 at a class's own seeds.
    """
    h, w, d = embed.shape
    flat = embed.reshape(h * w, d)
    # HIGHEST: accelerators would otherwise multiply in reduced precision (TF32 / bf16 passes),
    # and a seed's response to itself would no longer be 1.
    cos = jnp.einsum("pd,knd->pkn", flat, flat[seeds], precision=jax.lax.Precision.HIGHEST)
    return cos.max(-1).reshape(h, w, -1)
