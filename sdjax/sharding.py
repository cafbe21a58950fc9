"""Device meshes, logical-axis rules and global batches, for one host or a pod.

Models name their parameter and activation axes logically ("conv_out", "batch", ...); a
rules table from the config maps those names to mesh axes ("data", "fsdp", "tensor").
Rules follow Flax's priority semantics (the first rule for a name whose mesh axes are
still free wins); for parameters a rule is also skipped when the dimension is not
divisible by the mesh axes' size, so odd-sized parameters fall back to replication.
"""

import itertools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

# The logical-axis rules every config starts from: the batch over data (and fsdp) devices, the
# output side of every weight over fsdp, the input side over an optional tensor axis.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("conv_out", "fsdp"),
    ("dense_out", "fsdp"),
    ("vocab", "fsdp"),
    ("conv_in", "tensor"),
    ("dense_in", "tensor"),
    ("embed", "tensor"),
)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process run when one is configured, else does nothing.

    Explicit arguments (e.g. from flags) win; otherwise ``SDJAX_COORDINATOR``,
    ``SDJAX_NUM_PROCESSES`` and ``SDJAX_PROCESS_ID`` are read. On TPU pods and SLURM/Open MPI
    GPU clusters set ``SDJAX_DISTRIBUTED=auto`` to let JAX discover everything itself.
    Must run before anything touches the devices.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("SDJAX_COORDINATOR")
    num_processes = num_processes or int(env.get("SDJAX_NUM_PROCESSES", "0")) or None
    if process_id is None and "SDJAX_PROCESS_ID" in env:
        process_id = int(env["SDJAX_PROCESS_ID"])
    if env.get("SDJAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    elif num_processes and num_processes > 1:
        if coordinator_address is None or process_id is None:
            raise ValueError(f"A {num_processes}-process run needs a coordinator address (host:port) and this "
                             "process's id: set SDJAX_COORDINATOR and SDJAX_PROCESS_ID.")
        cpu = "cpu" in (jax.config.jax_platforms or env.get("JAX_PLATFORMS", ""))
        if cpu:  # CPU collectives need gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        if cpu:
            # Gloo connects the processes at their first collective over a set of devices and waits at most
            # 30 s for the others; connect now, when every process has just joined.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sdjax: processes joined")


_barriers = itertools.count()


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Returns once every process has reached this point (at once on one process).

    The coordination service's barrier, not a device collective: it waits up to ``timeout_s`` for a
    process that is still compiling or writing, where a collective on CPU (Gloo) gives a late peer
    30 s. Every process must call the same barriers in the same order.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client JAX's own multi-host utilities and Orbax wait on

    distributed.global_state.client.wait_at_barrier(f"sdjax/{next(_barriers)}/{name}", timeout_in_ms=timeout_s * 1000)


def resolve_mesh_shape(shape: Sequence[int], axes: Sequence[str], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1 entry so the mesh covers ``num_devices``; clear errors otherwise."""
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} must have the same length.")
    if len(set(axes)) != len(axes):
        raise ValueError(f"mesh.axes {axes} repeats an axis name.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape {shape}: use positive sizes and at most one -1 "
                         "(fill with the remaining devices).")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape {shape}: {num_devices} devices cannot be split into the fixed sizes "
                             f"(product {known}); pick sizes that divide {num_devices}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape {shape} has {math.prod(shape)} devices but this run has {num_devices} "
                         f"({jax.process_count()} process(es)); make the product equal or use -1 for one axis.")
    return shape


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices of all hosts (or ``devices``), laid out for the interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, axes, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # Backends without topology information.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, tuple(axes))


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over every device of every host (or ``devices``): inference."""
    return make_mesh((-1,), ("data",), devices)


def filter_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """The rules with mesh axes absent from ``mesh`` removed (e.g. "tensor" on a data x fsdp mesh)."""
    out = []
    for name, target in rules:
        if target is None:
            out.append((name, None))
            continue
        kept = tuple(a for a in ((target,) if isinstance(target, str) else target) if a in mesh.shape)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def _axes_tuple(target: Any) -> tuple[str, ...]:
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """Mesh PartitionSpec for one array: per dimension the first rule whose mesh axes are unused
    and divide the dimension; otherwise that dimension is replicated."""
    rules = filter_rules(rules, mesh)
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        chosen = None
        for rule_name, target in rules:
            axes = _axes_tuple(target)
            if rule_name != name or not axes or used & set(axes):
                continue
            if size % math.prod(mesh.shape[a] for a in axes) == 0:
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return P(*spec)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every leaf of an abstract tree whose leaves may be Flax
    ``Partitioned`` boxes (e.g. ``jax.eval_shape`` of an init returning boxed variables);
    unboxed leaves (step counters, RNG keys) are replicated. The result matches the unboxed tree."""
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)
    return jax.tree.map(lambda x, s: NamedSharding(mesh, logical_to_mesh_spec(s, x.shape, mesh, rules)),
                        shapes, specs, is_leaf=lambda s: isinstance(s, P))


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """Mesh axes the logical "batch" axis is split over."""
    for name, target in filter_rules(rules, mesh):
        if name == "batch":
            return _axes_tuple(target)
    return ()


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a global batch: leading axis over the batch mesh axes, the rest replicated."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, P(axes if len(axes) != 1 else axes[0]) if axes else P())


def check_batch_size(global_batch: int, mesh: Mesh, rules: Rules, micro_batches: int = 1) -> None:
    """Raises a clear error unless every micro-batch splits evenly over data parallelism and hosts."""
    dp = data_parallel_size(mesh, rules)
    if global_batch % micro_batches:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by train.grad_accum={micro_batches}.")
    micro = global_batch // micro_batches
    if micro % dp:
        raise ValueError(f"The micro-batch size {micro} (train.batch_size={global_batch} / grad_accum="
                         f"{micro_batches}) is not divisible by the data-parallel size {dp} (mesh axes "
                         f"{batch_axes(mesh, rules)} of mesh {dict(mesh.shape)}); change the batch size or the mesh.")
    if global_batch % jax.process_count():
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {jax.process_count()} hosts.")


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each host's slice (rows in process order) into global arrays sharded by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
