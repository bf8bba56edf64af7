"""SGD with PyTorch-style momentum and the poly learning-rate schedule (SPEC 4)."""

import optax


def poly_schedule(lr: float, end_lr: float, power: float, total_steps: int) -> optax.Schedule:
    """lr(it) = (lr - end_lr) * (1 - it / total_steps) ** power + end_lr, it 0-based, no warm-up."""
    return optax.polynomial_schedule(
        init_value=lr, end_value=end_lr, power=power, transition_steps=total_steps
    )


def make_optimizer(
    *,
    lr: float,
    end_lr: float,
    power: float,
    momentum: float,
    weight_decay: float,
    total_steps: int,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax.sgd's trace (v = g + mu v; p -= lr v) equals torch.optim.SGD without dampening."""
    schedule = poly_schedule(lr, end_lr, power, total_steps)
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate=schedule, momentum=momentum or None))
    return optax.chain(*parts), schedule
