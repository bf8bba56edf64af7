"""The device mesh, its axis name and the shardings of state and batches (one place for all)."""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices: Any = None) -> Mesh:
    """1-D data-parallel mesh over all devices, Auto axes (jax.make_mesh defaults to Explicit)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the data axis (the group axis of a batch)."""
    return NamedSharding(mesh, P(DATA))


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's rows (leading group axis) into global arrays sharded over DATA."""
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
