"""Joining the processes of a multi-host run (`jax.distributed`), with timeouts that name who is missing.

    initialize(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=0)   # explicit
    initialize()                          # from the cluster (Cloud TPU, SLURM, Open MPI, ...); else 1 process
    barrier("checkpoint-restored", timeout_s=600)

Every process runs the same program; afterwards `jax.devices()` lists the devices of all processes and
`jax.process_index()` is this one's id. On CPU the cross-process collectives use gloo (what the tests use
to run two processes on one machine). A process that never arrives turns into a `DistributedTimeout`
naming it instead of a silent hang: `initialize` waits at most `timeout_s` for every process to connect
(then exits with a message saying so), and `barrier` reports which processes did not reach it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Optional

import jax

class DistributedTimeout(RuntimeError):
    """A process did not connect or did not reach a barrier in time (the message names it)."""


def detect_cluster() -> Optional[str]:
    """The multi-process cluster JAX detects around this process (e.g. 'SlurmCluster', 'GceTpuCluster',
    'OmpiCluster', 'K8sCluster'), or None: JAX's own auto-detection, which then supplies the coordinator,
    process count and id to `jax.distributed.initialize()`."""
    try:
        from jax._src.clusters import ClusterEnv  # JAX exposes detection only inside initialize()

        types = ClusterEnv._cluster_types
    except (ImportError, AttributeError):
        logging.warning("cannot query JAX's cluster detection; pass --coordinator_address, --num_processes and "
                        "--process_id for a multi-process run")
        return None
    return next((env.__name__ for env in types if not env.opt_in_only_method and env.is_env_present()), None)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: int = 300) -> bool:
    """Join the other processes; returns whether this is a multi-process run.

    With `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id` given, uses
    them; with none given, lets JAX read them from the cluster environment when it detects one (SLURM, a
    Cloud TPU VM or GKE TPU pod, Open MPI, Kubernetes) and otherwise stays a single process. Must run before anything
    touches the devices. Raises DistributedTimeout when the processes do not all connect in `timeout_s`.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("coordinator_address, num_processes and process_id go together: give all three "
                         "(or none, to read them from the cluster environment)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id}: must lie in [0, num_processes={num_processes})")
    cluster = detect_cluster()
    if coordinator_address is None and cluster is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices only; GPUs/TPUs have their own
    where = coordinator_address or f"the coordinator found by JAX from the {cluster} environment"
    who = f"process {process_id}" if process_id is not None else "this process"
    message = (f"{who} could not join {num_processes or 'all'} processes through {where} within {timeout_s} s: "
               "a process was not started, failed before joining, or was started with another coordinator "
               "address / process count (each needs a distinct process_id)")
    # JAX's own deadline aborts the process from a C++ thread with a bare DEADLINE_EXCEEDED; this watchdog
    # fires first and exits with the message above instead.
    watchdog = threading.Timer(timeout_s, _exit_with, (f"DistributedTimeout: {message}",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(timeout_s) + 60)
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError; their module moved between jax versions
        if "DEADLINE_EXCEEDED" in str(e):
            raise DistributedTimeout(f"{message}. Underlying error: {str(e)[:500]}") from None
        raise
    finally:
        watchdog.cancel()
    logging.info("process %d of %d joined through %s; %d devices in all", jax.process_index(),
                 jax.process_count(), where, jax.device_count())
    return True


def _exit_with(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def barrier(name: str, timeout_s: float = 300) -> None:
    """Wait until every process reaches the barrier `name` (a no-op in a single process).

    Raises DistributedTimeout naming the processes that did not arrive within `timeout_s`. Every process
    first records its arrival in the coordinator's key-value store, so the missing ones can be listed.
    """
    if jax.process_count() == 1:
        return
    client = _client()
    me = jax.process_index()
    client.key_value_set(f"hymba_barrier/{name}/{me}", "arrived")
    try:
        client.wait_at_barrier(f"hymba_barrier/{name}", int(timeout_s * 1000))
    except Exception as e:
        if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
            raise
        missing = missing_processes(name)
        raise DistributedTimeout(
            f"barrier {name!r}: process(es) {missing} of {jax.process_count()} did not arrive within "
            f"{timeout_s:g} s (this is process {me}); look at their logs: they crashed, hang or run "
            "different code") from None


def missing_processes(name: str) -> list[int]:
    """Processes that have not recorded their arrival at barrier `name`."""
    arrived = set()
    for key, _ in _client().key_value_dir_get(f"hymba_barrier/{name}/"):
        match = re.search(r"/(\d+)$", key)
        if match:
            arrived.add(int(match.group(1)))
    return sorted(set(range(jax.process_count())) - arrived)


def _client():
    from jax._src import distributed  # the coordination client; JAX has no public handle to it

    if distributed.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized: call hymba_jax.distributed.initialize first")
    return distributed.global_state.client

