"""Multi-process start-up: `jax.distributed` from main.py's flags, checked before JAX starts.

One process per host (or per GPU): every process runs the same command with its own
`--process_id`; process 0's `--coordinator` address is where they meet. `--coordinator=auto`
lets JAX find the cluster itself (Cloud TPU slices, SLURM, Open MPI). Each process then feeds
only the groups of its own devices (`groups.local_group_indices`), writes its part of every
checkpoint, and evaluates its share of the images.
"""

import jax

from larvseg_jax.errors import ConfigError


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins the process group; nothing to do for a single-process run (no flags)."""
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ConfigError(
                "--num_processes and --process_id need --coordinator HOST:PORT (process 0's "
                "address; or --coordinator=auto on a TPU slice or under SLURM)"
            )
        return
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if num_processes is None or process_id is None:
        raise ConfigError(
            f"--coordinator {coordinator} needs --num_processes N and --process_id I (0..N-1), "
            "the same N and a different I in every process"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id {process_id} must be in 0..{num_processes - 1} for --num_processes "
            f"{num_processes}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator {coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:8476")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
