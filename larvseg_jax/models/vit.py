"""ViT encoder with AugReg parameter names and the variant table (SPEC 1.1, D1, 12).

Parameter tree (a plain tree map from an AugReg .npz, see `pretrained.py`):
  embedding/{kernel,bias}, cls, Transformer/posembed_input/pos_embedding,
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
  LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}}, Transformer/encoder_norm.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from larvseg_jax import interp
from larvseg_jax.models import attention as attention_lib
from larvseg_jax.models import matmul

LN_EPS = 1e-6
# Projections run through `matmul.dense`: the bias is added to the accumulator and rounded once,
# so in bf16 compute the bias gradient is a float32 sum (a bf16 sum was a slow reduce-window on
# XLA:CPU, ~6 % of the bf16 backbone step).
POS_RESIZE_RULES = ("shape", "token_count")

VARIANTS: dict[str, dict[str, int]] = {
    "B/16": {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072, "patch_size": 16},
    "tiny": {"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256, "patch_size": 8},
    "micro": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "patch_size": 8},
}


def _xavier_flat(num_in_axes: int) -> Callable:
    """Xavier-uniform over the kernel flattened to [prod(in axes), prod(out axes)].

    The AugReg attention kernels are 3-D ([D, heads, Dh] and [heads, Dh, D]); computing fans on
    the flattened matrix gives the same scale as a 2-D [D, D] projection (big_vision's init).
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in = int(np.prod(shape[:num_in_axes]))
        flat = nn.initializers.xavier_uniform()(key, (fan_in, int(np.prod(shape[num_in_axes:]))))
        return flat.reshape(shape).astype(dtype)

    return init


class _Projection(nn.Module):
    """Holds one AugReg projection's kernel and bias; the caller fuses the contraction."""

    kernel_shape: Sequence[int]
    bias_shape: Sequence[int]
    num_in_axes: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", _xavier_flat(self.num_in_axes), tuple(self.kernel_shape))
        bias = self.param("bias", nn.initializers.zeros, tuple(self.bias_shape))
        return kernel, bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with qkv bias; one fused QKV contraction, heads first."""

    num_heads: int
    implementation: str = "auto"
    dtype: Any = jnp.float32
    gemm: str = "auto"  # matmul.GEMM_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, N, D] -> [B, N, D]."""
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        dh = d // self.num_heads
        qkv = [
            _Projection((d, self.num_heads, dh), (self.num_heads, dh), 1, name=n)()
            for n in ("query", "key", "value")
        ]
        b, n = x.shape[:2]
        # Separate AugReg params, one token-major [B*N, D] x [D, 3*H*Dh] GEMM, then one transpose
        # to heads first (the [B, N, H, Dh] layout makes the attention products ~4x slower on
        # CPU, ENVIRONMENT 9); `matmul.dense`'s kernel gradient is then one 2-D GEMM too.
        kernel = jnp.stack([p[0] for p in qkv], axis=1).astype(self.dtype)  # [D, 3, H, Dh]
        bias = jnp.stack([p[1] for p in qkv], axis=0)  # [3, H, Dh]
        qkv = matmul.dense(
            x.astype(self.dtype), kernel.reshape(d, 3 * d), bias.reshape(3 * d), gemm=self.gemm
        )
        qkv = qkv.reshape(b, n, 3, self.num_heads, dh).transpose(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
        o = attention_lib.attention(
            qkv[0], qkv[1], qkv[2], implementation=self.implementation
        )  # [B, H, N, Dh]
        out_kernel, out_bias = _Projection((self.num_heads, dh, d), (d,), 2, name="out")()
        o = o.transpose(0, 2, 1, 3).reshape(b, n, d)  # token-major, heads concatenated
        return matmul.dense(
            o, out_kernel.reshape(d, d).astype(self.dtype), out_bias, gemm=self.gemm
        )


class Dense(nn.Module):
    """nn.Dense's parameters and math, its matmul through `matmul.dense` (float32 accumulation
    in bf16 compute, both passes; the kernel gradient as one GEMM over tokens)."""

    features: int
    dtype: Any = jnp.float32
    gemm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.xavier_uniform(), (x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.normal(1e-6), (self.features,))  # big_vision
        return matmul.dense(x.astype(self.dtype), kernel.astype(self.dtype), bias, gemm=self.gemm)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch's nn.GELU computes it, 0.5 x (1 + erf(x / sqrt 2)) (SPEC 12).

    Not `nn.gelu(approximate=False)`: flax writes it with erfc, which XLA:CPU evaluates about 2x
    slower than erf (`benchmarks/backbone_parts.py`); the two agree to float32 rounding.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 2**-0.5))


class MlpBlock(nn.Module):
    """Dense -> exact GELU -> Dense (SPEC 12: erf GELU, not the tanh approximation)."""

    mlp_dim: int
    dtype: Any = jnp.float32
    gemm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = Dense(self.mlp_dim, self.dtype, self.gemm, name="Dense_0")(x)
        x = gelu(x)
        return Dense(d, self.dtype, self.gemm, name="Dense_1")(x)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zeroes whole samples of a residual branch, scales kept ones by 1/(1-p).

    Args:
      x: [B, ...] branch output.
      rate: drop probability p (static).
      rng: PRNG key.

    Returns:
      x with each sample either zeroed or multiplied by 1/(1-p), as timm/mmcv's DropPath.
    """
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class EncoderBlock(nn.Module):
    """Pre-LN block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))) (SPEC 1.1)."""

    num_heads: int
    mlp_dim: int
    drop_path_rate: float = 0.0
    attention: str = "auto"
    dtype: Any = jnp.float32
    gemm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x [B, N, D] -> [B, N, D]; `train` positional, static under `nn.remat`."""

        def residual(branch):
            if train and self.drop_path_rate > 0.0:
                # Independent masks for the two branches, as two DropPath calls in mmcv.
                return drop_path(branch, self.drop_path_rate, self.make_rng("dropout"))
            return branch

        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="LayerNorm_0")(x)
        y = SelfAttention(
            self.num_heads,
            self.attention,
            self.dtype,
            self.gemm,
            name="MultiHeadDotProductAttention_1",
        )(y)
        x = x + residual(y)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dtype, self.gemm, name="MlpBlock_3")(y)
        return x + residual(y)


class AddPositionEmbs(nn.Module):
    """Adds the learned table [1, 1 + gh*gw, D], resized on the fly to the token grid (SPEC 1.1).

    `resize_rule="shape"` resizes whenever the grid shape differs from `pos_grid`;
    `"token_count"` is the official rule (SPEC D1): resize only when the number of tokens differs,
    so e.g. a 2x8 grid gets a 4x4 table added row-major, unchanged.
    """

    pos_grid: tuple[int, int]
    resize_rule: str = "shape"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """x [B, 1 + h*w, D] (class token first), grid (h, w) -> x + table."""
        gh, gw = self.pos_grid
        d = x.shape[-1]
        table = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, 1 + gh * gw, d)
        )
        if self.resize_rule == "shape":
            resize = tuple(grid) != (gh, gw)
        elif self.resize_rule == "token_count":
            resize = grid[0] * grid[1] != gh * gw
        else:
            raise ValueError(
                f"unknown pos_resize_rule {self.resize_rule!r}; use {POS_RESIZE_RULES}"
            )
        if resize:
            # Resized in the table's float32, then cast: the resize is differentiable, so the
            # stored table is trained through it (as in the official code).
            table = interp.resize_pos_embed(table, (gh, gw), grid)
        return matmul.add_broadcast(x, table.astype(self.dtype))


class PatchEmbedding(nn.Module):
    """The ViT's p x p, stride-p convolution (nn.Conv's parameters: kernel [p, p, 3, D], bias),
    computed as patches @ kernel. Same sums; but XLA:CPU ran the convolution's kernel gradient
    as a generic strided convolution, 1.45 s per 2 images at 512 (a sixth of the ViT-B/16
    step), where the matmul takes milliseconds."""

    width: int
    patch_size: int
    dtype: Any = jnp.float32
    gemm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] with H, W multiples of the patch -> [B, H/p, W/p, D]."""
        p, (b, height, width, c) = self.patch_size, x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        patches = x.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, height // p, width // p, p * p * c).astype(self.dtype)
        kernel = kernel.reshape(p * p * c, self.width).astype(self.dtype)
        return matmul.dense(patches, kernel, bias, gemm=self.gemm)


class Encoder(nn.Module):
    """Position embedding, `depth` blocks with linearly increasing drop-path, final LayerNorm."""

    depth: int
    num_heads: int
    mlp_dim: int
    pos_grid: tuple[int, int]
    drop_path_rate: float = 0.0
    pos_resize_rule: str = "shape"
    attention: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass
    gemm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int], *, train: bool) -> jax.Array:
        """x [B, 1 + h*w, D] -> [B, 1 + h*w, D] after the final LayerNorm."""
        x = AddPositionEmbs(
            tuple(self.pos_grid), self.pos_resize_rule, self.dtype, name="posembed_input"
        )(x, grid)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
        # Rematerialisation keeps one [B, N, D] input per block for the backward pass instead
        # of every intermediate (the MLP's 4D-wide activations, attention statistics).
        block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
        for i in range(self.depth):
            x = block(
                self.num_heads,
                self.mlp_dim,
                float(rates[i]),
                self.attention,
                self.dtype,
                self.gemm,
                name=f"encoderblock_{i}",
            )(x, train)
        return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
    """Plain ViT backbone returning the last layer's patch tokens (SPEC 1.1, the neck output)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    pos_grid: tuple[int, int]  # grid of the stored position table (32x32 for B/16 at 512)
    drop_path_rate: float = 0.0
    pos_resize_rule: str = "shape"  # "shape" | "token_count" (official, SPEC D1)
    attention: str = "auto"  # attention.IMPLEMENTATIONS
    dtype: Any = jnp.float32  # compute dtype; params stay float32
    remat: bool = False  # rematerialise each transformer block in the backward pass
    gemm: str = "auto"  # matmul.GEMM_IMPLEMENTATIONS: the projections' GEMMs

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Encodes images.

        Args:
          images: [B, H, W, 3] float (normalised).
          train: enables drop-path (needs the 'dropout' rng collection when drop_path_rate > 0).

        Returns:
          [B, h, w, D] tokens after the final LayerNorm, class token removed, with
          h = ceil(H / patch), w = ceil(W / patch).
        """
        p = self.patch_size
        b, height, width = images.shape[:3]
        # Zero padding on the bottom/right to a multiple of the patch (mmseg pad_to_patch_size).
        pad_h, pad_w = -height % p, -width % p
        x = jnp.pad(images.astype(self.dtype), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        x = PatchEmbedding(self.width, p, self.dtype, self.gemm, name="embedding")(x)  # [B,h,w,D]
        h, w = x.shape[1:3]
        x = x.reshape(b, h * w, self.width)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
        x = Encoder(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            pos_grid=tuple(self.pos_grid),
            drop_path_rate=self.drop_path_rate,
            pos_resize_rule=self.pos_resize_rule,
            attention=self.attention,
            dtype=self.dtype,
            remat=self.remat,
            gemm=self.gemm,
            name="Transformer",
        )(x, (h, w), train=train)
        return x[:, 1:].reshape(b, h, w, self.width)


def vit_from_variant(variant: str, **overrides: Any) -> ViT:
    """ViT with the sizes of `VARIANTS[variant]`; `overrides` sets any other field (pos_grid...)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(ViT)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown ViT fields {sorted(unknown)}")
    kwargs = {**VARIANTS[variant], **overrides}
    kwargs.setdefault("pos_grid", (32, 32) if variant == "B/16" else (8, 8))
    return ViT(**kwargs)
