"""Union vocabulary, per-source index lists and the base/novel split (SPEC 1.4, 5.2, 5.3).

Classes are matched by name string: a name shared by two sources is one row of the class
embedding table, trained by both. A source only ever sees its own classes in the softmax.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -1  # the one label id meaning "unlabelled" in every decoded label array


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The union table and the evaluation vocabulary with its base/novel split (SPEC 5.3)."""

    union: tuple[str, ...]
    eval_names: tuple[str, ...]
    eval_index: np.ndarray  # [N_eval] rows of the union table
    base: tuple[str, ...]
    novel: tuple[str, ...]


def build_union(name_lists: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Union of several vocabularies, in order of first occurrence (a fixed, reproducible order)."""
    seen: dict[str, None] = {}
    for names in name_lists:
        for name in names:
            seen.setdefault(name, None)
    return tuple(seen)


def class_index(union: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Rows of the union table for a source's classes ([N] int32; duplicates share a row)."""
    position = {name: i for i, name in enumerate(union)}
    missing = [n for n in names if n not in position]
    if missing:
        raise ValueError(f"classes {missing[:5]} are not in the union vocabulary")
    return np.asarray([position[n] for n in names], np.int32)


def base_novel_split(
    eval_names: Sequence[str], supervised_names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Base = evaluation classes that receive pixel labels (same name as a supervised class).

    This is the paper-time "rule 2" of SPEC 5.3 (58/92 on A150 with V1 C171 names).
    """
    supervised = set(supervised_names)
    base = [n for n in eval_names if n in supervised]
    novel = [n for n in eval_names if n not in supervised]
    return base, novel


def sample_classes(
    rng: jax.Array, present: jax.Array, num_sample: int, size: int
) -> tuple[jax.Array, jax.Array]:
    """Sampled vocabulary of one step: num_sample random classes plus every present one (SPEC 2.6).

    Static-shape form of `R = random.sample(range(N), 100); R | present`: every class gets a
    random key, the num_sample smallest keys form R, and the union is returned as the first
    `size` positions of its (ascending) indices, padded. Softmaxes and the mask norm are
    permutation invariant, so the official set order does not matter.

    Args:
      rng: key of this step and group.
      present: [N] bool classes present anywhere in the group's full-resolution labels (D3).
      num_sample: R (100 in the s100 configs); min(R, N) are drawn.
      size: static length S >= R + max present classes.

    Returns:
      positions [S] int32 local class ids and valid [S] bool (False = padding).
    """
    n = present.shape[0]
    keys = jax.random.uniform(rng, (n,))
    drawn = jnp.argsort(jnp.argsort(keys)) < min(num_sample, n)
    chosen = drawn | present
    positions = jnp.nonzero(chosen, size=size, fill_value=0)[0].astype(jnp.int32)
    valid = jnp.arange(size) < jnp.sum(chosen)
    return positions, valid


def remap_labels(labels: jax.Array, positions: jax.Array, valid: jax.Array, n: int) -> jax.Array:
    """Local class ids -> positions in the sampled vocabulary; unsampled classes -> IGNORE (-1)."""
    inverse = jnp.full((n + 1,), -1, jnp.int32)
    inverse = inverse.at[jnp.where(valid, positions, n)].set(jnp.arange(positions.shape[0]))
    inverse = inverse.at[n].set(-1)
    return inverse[jnp.where(labels >= 0, labels, n)]
