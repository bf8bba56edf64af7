"""Train metrics: averaged on device over a log window, the non-finite bookkeeping, the
progress line with throughput and ETA, and the parameter summary at the start of a run."""

import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview

from larvseg_jax.errors import NonFiniteError
from larvseg_jax.experiment import Setup
from larvseg_jax.progress import format_seconds
from larvseg_jax.train_step import TrainState, metric_names


def _finite_average(name: str) -> type[clu_metrics.Metric]:
    """Average of output `name` over the window's finite steps (skipped steps not averaged)."""

    @flax.struct.dataclass
    class FiniteAverage(clu_metrics.Average):
        @classmethod
        def from_model_output(cls, **out) -> clu_metrics.Average:
            finite = out["finite"]
            value = jnp.asarray(out[name], jnp.float32)
            return cls(total=jnp.where(finite, value, 0.0), count=finite.astype(jnp.int32))

    return FiniteAverage


def _bad_count(test) -> type[clu_metrics.Metric]:
    """Steps of the window for which `test(outputs)` is True (non-finite bookkeeping)."""

    @flax.struct.dataclass
    class Count(clu_metrics.Metric):
        total: jax.Array

        @classmethod
        def from_model_output(cls, **out) -> clu_metrics.Metric:
            return cls(total=test(out).astype(jnp.int32))

        def merge(self, other):
            return type(self)(total=self.total + other.total)

        def compute(self):
            return self.total

    return Count


NO_STEP = np.iinfo(np.int32).max


@flax.struct.dataclass
class _FirstNonFinite(clu_metrics.Metric):
    """The first step of the window whose loss or gradients were not finite (NO_STEP: none)."""

    step: jax.Array

    @classmethod
    def from_model_output(cls, **out) -> clu_metrics.Metric:
        return cls(step=jnp.where(out["finite"], NO_STEP, out["step"]).astype(jnp.int32))

    def merge(self, other):
        return type(self)(step=jnp.minimum(self.step, other.step))

    def compute(self):
        return self.step


def make_metrics_collection(settings) -> type[clu_metrics.Collection]:
    """A clu Collection of each train metric averaged over a log window's finite steps, plus
    the count of non-finite steps, the first of them and which loss terms were not finite."""
    names = metric_names(settings)
    fields = {n: _finite_average(n) for n in names}
    fields["skipped_steps"] = _bad_count(lambda out: ~out["finite"])
    fields["first_nonfinite_step"] = _FirstNonFinite
    for n in names:
        if n.startswith(("loss", "aux_")):
            fields[f"nonfinite_{n}"] = _bad_count(lambda out, n=n: ~jnp.isfinite(out[n]))
    fields["nonfinite_gradients"] = _bad_count(
        lambda out: jnp.isfinite(out["loss"]) & ~out["grads_finite"]
    )
    return clu_metrics.Collection.create(**fields)


class LogWindow:
    """Train metrics averaged on device over `log_every_steps`; one progress line per window."""

    def __init__(self, setup: Setup, writer: Any, step: int):
        self.loop = setup.loop
        self.writer = writer
        self.images_per_step = setup.settings.num_groups * setup.settings.images_per_group
        self.metrics: clu_metrics.Collection | None = None
        self.first, self.start = step, time.perf_counter()
        self.warned_unvisited = False
        self.skipped_total = 0

    def add(self, step_metrics: clu_metrics.Collection) -> None:
        self.metrics = step_metrics if self.metrics is None else self.metrics.merge(step_metrics)

    def flush(self, step: int) -> None:
        """Fetches the window's means (one host sync), checks them, logs and writes TB."""
        if self.metrics is None:
            return
        means = {k: float(v) for k, v in jax.device_get(self.metrics.compute()).items()}
        self.metrics = None
        window = step - self.first
        if self._nonfinite(means, step) == window:
            logging.warning(
                "step %d: every step since %d was skipped (non-finite)", step, self.first
            )
            self.first, self.start = step, time.perf_counter()
            return
        bad = [k for k, v in means.items() if not np.isfinite(v)]
        if bad:
            raise NonFiniteError(
                f"non-finite {', '.join(bad)} between steps {self.first} and {step}: lower "
                "--config.optim.lr or check the data"
            )
        self._warn_unvisited(means)
        now = time.perf_counter()
        # The first window includes compilation; throughput is honest from the second.
        rate = (step - self.first) * self.images_per_step / max(now - self.start, 1e-9)
        eta = (self.loop.total_steps - step) * self.images_per_step / max(rate, 1e-9)
        self.first, self.start = step, now
        terms = "  ".join(
            f"{k} {v:.4f}" for k, v in means.items() if k.startswith(("loss_", "aux_"))
        )
        logging.info(
            "step %d/%d  loss %.4f  %s  lr %.2e  %.1f img/s  ETA %s",
            step,
            self.loop.total_steps,
            means["loss"],
            terms,
            means["lr"],
            rate,
            format_seconds(eta),
        )
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/images_per_sec"] = rate
        self.writer.write_scalars(step, scalars)

    def _nonfinite(self, means: dict, step: int) -> int:
        """Pops the non-finite bookkeeping from `means`; stops or warns per train.nonfinite.

        Returns the window's count of skipped (non-finite) steps.
        """
        skipped = int(means.pop("skipped_steps"))
        first = int(means.pop("first_nonfinite_step"))
        terms = [
            k.removeprefix("nonfinite_")
            for k in [k for k in means if k.startswith("nonfinite_")]
            if means.pop(k) > 0
        ]
        self.skipped_total += skipped
        self.writer.write_scalars(step, {"train/skipped_steps": skipped})  # in this window
        if not skipped:
            return 0
        what = f"non-finite {', '.join(terms) or 'loss'} at step {first}"
        if skipped > 1:
            what += f" (and {skipped - 1} more of steps {first}-{step - 1})"
        kept = "params, optimizer state and memory bank were left as they were for those steps"
        if self.loop.nonfinite == "stop":
            raise NonFiniteError(
                f"{what}; {kept} and training stopped: lower --config.optim.lr, check that "
                "source's data, or pass --config.train.nonfinite=skip to go on past such steps"
            )
        logging.warning("%s: skipped (%s; %d skipped so far)", what, kept, self.skipped_total)
        return skipped

    def _warn_unvisited(self, means: dict) -> None:
        """Warns once when crops carry more labels than the CA pair lists hold."""
        over = {
            k.removeprefix("unvisited_labels_"): v for k, v in means.items() if "unvisited" in k
        }
        over = {k: v for k, v in over.items() if v > 0}
        if over and not self.warned_unvisited:
            logging.warning(
                "crops of %s had more than data.max_labels=%d labels (%s per step): those labels "
                "got no CA-classifier pair; raise --config.data.max_labels",
                ", ".join(over),
                self.loop.max_labels,
                ", ".join(f"{v:.1f}" for v in over.values()),
            )
            self.warned_unvisited = True


def log_parameters(state: TrainState, writer: Any) -> None:
    """Parameter counts in the log; clu's full parameter table in TensorBoard's text tab."""
    counts = {k: int(parameter_overview.count_parameters(v)) for k, v in state.params.items()}
    logging.info(
        "parameters: %s (%s)",
        f"{sum(counts.values()):,}",
        ", ".join(f"{k} {v:,}" for k, v in counts.items()),
    )
    logging.info(
        "process %d of %d: %d local of %d devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    table = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    writer.write_texts(0, {"parameters": "```\n" + table + "\n```"})
