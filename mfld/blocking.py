"""The blocking of a drift evaluation over (particles, data): :func:`plan_chunks` and the
constants its rules use (the measurements behind the constants are in docs/performance.md,
"The step" and "Where the constants come from").

A drift evaluation (:func:`mfld.network.interaction`) is one block, *data blocks* (all
particles x ``b`` data rows, two GEMMs) or *particle blocks* (``c`` particles x all rows, three
GEMMs). The plan depends on the shapes, the itemsize, the memory budget and the CPU thread
count only -- never on values -- so it is fixed at trace time.
"""

from __future__ import annotations

from typing import NamedTuple

from mfld.problem import Problem

#: Default budget (bytes) for the temporaries of one drift evaluation (see :func:`plan_chunks`).
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Target number of (particle, data) pairs per block on one CPU thread (1 MiB per float32
#: temporary): a block's activations stay in the core's L2 cache. With T threads the target is
#: ``BLOCK_TARGET * T^2`` (at most ``BLOCK_TARGET_MAX``): XLA splits every op of a block over
#: the threads, and small ops do not pay for the synchronisation (measured: docs/performance.md).
BLOCK_TARGET = 1 << 18
BLOCK_TARGET_MAX = 1 << 22
#: Data rows per block of the two-GEMM data-blocked evaluation on one thread, times T with T
#: threads (at most ``DATA_BLOCK_MAX``); the fastest row counts measured with YNNPACK's dot
#: fusion (mfld.xla; docs/performance.md).
DATA_BLOCK = 128
DATA_BLOCK_MAX = 512
#: Smallest p (features incl. bias) for which data blocks (two GEMMs) are used rather than
#: particle blocks (three GEMMs): with YNNPACK's dot fusion data blocks were faster from p = 11
#: on, particle blocks at p = 3 (docs/performance.md).
DATA_BLOCK_MIN_FEATURES = 8
#: Largest (N, p) gradient accumulator (bytes) for data blocks: it is read and written once per
#: data block, which pays only while it stays in cache.
DATA_BLOCK_MAX_ACCUMULATOR = 32 << 20
#: Temporaries of shape (block particles, block data) alive at once inside a block:
#: pre-activations/sigma, sigma' * u (and the GEMM's output).
_BLOCK_BUFFERS = 3


class ChunkPlan(NamedTuple):
    """How a drift evaluation is blocked: ``particles`` per particle chunk and ``data`` rows
    per data chunk. One block holds ``particles x data`` pre-activations. ``particles >= N``
    (one particle chunk) with ``data < n`` is the two-GEMM data-blocked evaluation; several
    particle chunks recompute the forward GEMM in the backward pass."""

    particles: int
    data: int

    def n_blocks(self, n_particles, n_data):
        return -(-n_particles // self.particles), -(-n_data // self.data)


def cpu_threads() -> int:
    """The cores this process may run on (what XLA's CPU thread pool uses; see
    :func:`mfld.sharding.configure_cpu` to pin it)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_chunks(n_particles: int, n_data: int, itemsize: int = 4, *, n_features: int | None = None,
                memory_budget: int | None = None, block_target: int | None = None,
                threads: int | None = None) -> ChunkPlan:
    """Choose the blocking of a drift evaluation over (particles, data).

    Memory formula (bytes) of the temporaries of one evaluation with blocks of ``c``
    particles and ``b`` data rows::

        temporaries = 3 * c * b * itemsize            (sigma, sigma' u, GEMM output)

    Rules (``n_features`` = p, the width of x; unknown p means "small"; T = ``threads``,
    default :func:`cpu_threads`; ``block_target`` default ``min(BLOCK_TARGET T^2,
    BLOCK_TARGET_MAX)``; data rows ``b_d = min(DATA_BLOCK T, DATA_BLOCK_MAX)``):

    1. ``N n <= min(block_target, budget / (3 s))``: one block (two GEMMs, sigma reused);
    2. ``p >= DATA_BLOCK_MIN_FEATURES``, ``N p s <= DATA_BLOCK_MAX_ACCUMULATOR`` and
       ``3 N b_d s <= budget``: data blocks of ``b_d`` rows with all particles (two GEMMs);
    3. otherwise particle blocks (three GEMMs): ``c * b`` is the largest of
       ``min(N n, block_target)`` within the budget; the data axis is split only when even
       8 particles times all ``n`` rows exceed the budget.

    The whole step adds the particle arrays and the data::

        step total ~= 5 * N * D * itemsize + n * p * itemsize + temporaries

    (state in and out, the drift, the noise draw and a padding copy; see docs/performance.md).
    Block sizes are balanced so the padding is less than one row per block. The blocking
    changes the order of the floating-point sums only: runs with different thread counts agree
    up to reassociation, runs with the same thread count bit for bit.
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    threads = cpu_threads() if threads is None else max(1, int(threads))
    target = min(BLOCK_TARGET * threads ** 2, BLOCK_TARGET_MAX) if block_target is None else int(block_target)
    data_block = min(DATA_BLOCK * threads, DATA_BLOCK_MAX)
    max_pairs = max(1, budget // (_BLOCK_BUFFERS * itemsize))
    pairs = max(1, min(target, max_pairs))
    n_particles, n_data = int(n_particles), int(n_data)
    if n_particles * n_data <= pairs:
        return ChunkPlan(n_particles, n_data)
    if (n_features is not None and n_features >= DATA_BLOCK_MIN_FEATURES and n_data > data_block
            and n_particles * n_features * itemsize <= DATA_BLOCK_MAX_ACCUMULATOR
            and n_particles * data_block <= max_pairs):
        return ChunkPlan(n_particles, _balanced(n_data, data_block))
    min_c = min(8, n_particles)
    if min_c * n_data <= max_pairs:
        b = n_data
        c = max(min_c, pairs // n_data)
    else:  # split the data too
        c = min_c
        b = max(1, max_pairs // c)
    c = _balanced(n_particles, c)
    b = _balanced(n_data, b)
    return ChunkPlan(c, b)


def drift_plan(problem: Problem, n_particles: int, batch_size: int | None = None,
               memory_budget: int | None = None) -> ChunkPlan:
    """The blocking :func:`interaction` uses in a step with ``n_particles`` (per-device)
    particles and minibatches of ``batch_size`` rows (``None``: all rows)."""
    n = problem.x.shape[0]
    m = n if batch_size is None or batch_size >= n else int(batch_size)
    return plan_chunks(n_particles, m, problem.x.dtype.itemsize, n_features=problem.x.shape[1],
                       memory_budget=memory_budget)


def dot_fusion_pays(problem: Problem, n_particles: int, batch_size: int | None = None,
                    memory_budget: int | None = None) -> bool:
    """Whether a step program should be compiled with YNNPACK's dot fusion (:mod:`mfld.xla`):
    yes for one block and data blocks (where it was measured faster), no for particle blocks
    (where it was measured slower; docs/performance.md)."""
    return drift_plan(problem, n_particles, batch_size, memory_budget).particles >= n_particles


def _balanced(total, size):
    size = max(1, min(size, total))
    k = -(-total // size)
    return -(-total // k)
