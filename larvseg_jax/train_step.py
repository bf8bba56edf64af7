"""The train state pytree and the pure, sharded train step (SPEC 2, 3).

One step = `num_groups` virtual devices ("groups") of B images, each group holding one source
with its own crop size. Inside `shard_map` every device runs its groups in a `lax.scan`, and
`lax.switch` on the group's source id runs only that source's forward and loss. The loss of the
step is the mean of the group losses, so the gradient is the mean over virtual devices exactly as
DDP averages the official per-GPU gradients, on any device count.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from larvseg_jax import losses
from larvseg_jax.experiment import SourceSpec, StepSettings
from larvseg_jax.sharding import DATA


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32; per-step keys are fold_in(rng, step)


def create_train_state(
    rng: jax.Array, model: Any, tx: optax.GradientTransformation, image_size: int
) -> TrainState:
    """Random init (pure; use under jax.eval_shape for an abstract state)."""
    init_rng, state_rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = model.init(init_rng, images, jnp.zeros((1,), jnp.int32), train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )


def group_loss(
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    model: Any,
    spec: SourceSpec,
    settings: StepSettings,
) -> tuple[jax.Array, jax.Array]:
    """Weighted loss of one virtual device holding `spec`'s source (SPEC 2.2, 2.3, 2.7).

    Args:
      images: [B, H, W, 3]; labels: [B, H, W] local class ids, IGNORE = -1.

    Returns:
      the weighted loss and the unweighted basic loss (for logging).
    """
    cls_index = jnp.asarray(spec.cls_index, jnp.int32)
    logits, _ = model.apply(
        {"params": params}, images, cls_index, train=True, rngs={"dropout": rng}
    )
    logits, labels = losses.loss_grid_inputs(logits, labels, settings.downsample_rate)
    if spec.kind == "seg":
        basic = losses.seg_ce(logits, labels, normalize=settings.seg_normalize)
    else:
        basic, _ = losses.image_level_ce(logits, labels)
    return spec.basic_weight * basic, basic


def _device_loss(params, batch, rng, *, model, settings, groups_per_device):
    """Sum over this device's groups of loss_g / G, and per-source loss sums/counts."""
    num_sources = len(settings.sources)
    first = jax.lax.axis_index(DATA) * groups_per_device
    all_ids = jnp.asarray(settings.group_source_ids, jnp.int32)
    local_ids = jax.lax.dynamic_slice(all_ids, (first,), (groups_per_device,))
    global_index = first + jnp.arange(groups_per_device)

    def branch(s, group_batch, key):
        spec = settings.sources[s]
        data = group_batch[spec.name]
        loss, basic = group_loss(
            params, data["image"], data["label"], key, model=model, spec=spec, settings=settings
        )
        return loss, jax.nn.one_hot(s, num_sources) * basic

    branches = [functools.partial(branch, s) for s in range(num_sources)]

    def body(total, xs):
        source_id, g, group_batch = xs
        key = jax.random.fold_in(rng, g)  # same key for group g on any device count
        loss, per_source = jax.lax.switch(source_id, branches, group_batch, key)
        return total + loss, (loss, per_source, jax.nn.one_hot(source_id, num_sources))

    total, (group_losses, per_source, counts) = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (local_ids, global_index, batch)
    )
    aux = {"basic_sum": per_source.sum(0), "count": counts.sum(0), "group_loss": group_losses}
    return total / settings.num_groups, aux


def train_step(
    state: TrainState,
    batch: Any,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    settings: StepSettings,
    mesh: Mesh,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict]:
    """One SGD step over the global batch.

    Args:
      state: replicated TrainState.
      batch: {source: {"image": [G, B, H_s, W_s, 3], "label": [G, B, H_s, W_s]}} sharded over
        DATA on the group axis; rows of groups holding another source are padding.

    Returns:
      the new state and metrics: "loss" (the step objective), "loss_<source>" (mean unweighted
      basic loss over that source's groups), "lr" and "group_loss" [G] (weighted loss per group).
    """
    groups_per_device = settings.num_groups // mesh.devices.size
    step_rng = jax.random.fold_in(state.rng, state.step)

    def per_device(params, local_batch, rng):
        fn = functools.partial(
            _device_loss, model=model, settings=settings, groups_per_device=groups_per_device
        )
        (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params, local_batch, rng)
        group_loss = aux.pop("group_loss")
        return jax.lax.psum((loss, aux, grads), DATA), group_loss

    # check_vma=False: gradients stay per-device until the explicit psum (no implicit reduction).
    (loss, aux, grads), group_losses = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA), P()),
        out_specs=(P(), P(DATA)),
        check_vma=False,
    )(state.params, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "group_loss": group_losses}
    for s, spec in enumerate(settings.sources):
        metrics[f"loss_{spec.name}"] = aux["basic_sum"][s] / jnp.maximum(aux["count"][s], 1)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics
