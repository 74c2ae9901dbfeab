"""Multi-host initialisation: one call that every process runs before touching devices.

On CPU the cross-process collectives go through gloo. The coordinator is process 0's address;
`scripts/launch_multihost.py` starts N processes on one machine and passes these settings through
the environment (PIKV_COORDINATOR, PIKV_NUM_PROCESSES, PIKV_PROCESS_ID).
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "PIKV_COORDINATOR"
ENV_NUM_PROCESSES = "PIKV_NUM_PROCESSES"
ENV_PROCESS_ID = "PIKV_PROCESS_ID"


def use_cpu_collectives(implementation: str = "gloo") -> None:
    """Selects the CPU collectives backend (must run before the backend starts)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", implementation)
    except (AttributeError, KeyError, ValueError):  # pragma: no cover - option absent in this jax
        pass


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo") -> tuple[int, int]:
    """`jax.distributed.initialize` with arguments from the call or the PIKV_* environment.

    Returns (process_id, num_processes). A single process without a coordinator is a no-op.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = int(num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES, 1))
    process_id = int(process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID, 0))
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if num_processes == 1 and coordinator_address is None:
        return 0, 1
    if coordinator_address is None:
        raise ValueError(f"num_processes={num_processes} needs a coordinator_address (host:port) "
                         f"or the {ENV_COORDINATOR} environment variable")
    use_cpu_collectives(cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return jax.process_index(), jax.process_count()


__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "initialize", "use_cpu_collectives"]
