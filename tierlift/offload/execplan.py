"""The execution plan: what the engine does with every chunk, as pure data.

Pure: no process group, no I/O, no tensors.  One rule places optimizer state,
``place_chunks``, and every user of placement calls it: the engine's host
optimizer (``offload/optimizer.py``), the cost model (``runtime/planner.py``) and
``tierlift plan`` (``launch/cmd_plan.py``).

The rule is **first-fit in forward order** (root first, then the units in the order
the forward gathers them): each chunk whose shard still fits the remaining
``max_in_cpu`` elements keeps its optimizer state in host memory, the others go to
NVMe.  Why first-fit and not a prefix ("the first k chunks"): a prefix stops at the
first chunk that does not fit, so one large chunk early (the root with the
embeddings) sends everything behind it to NVMe while the budget could hold several
later chunks; first-fit uses the same budget fully.  Why forward order: the host
tier's advantage is latency, and the chunks the next forward needs first (its
earliest deadlines, see ``offload/backlog.py``) are the ones whose step must not
wait for a disk read.  With shards (100, 50, 50, 50) and max_in_cpu=60, chunk 1 is
in host memory, the others on NVMe, in the engine and in ``tierlift plan`` alike.

``ExecutionPlan`` is built once from the config, the chunk layout and the budgets
(``build_execution_plan``); the engine is built from it and checks after
construction and after every change (a policy decision applied at a step
boundary) that the placement it has is the placement planned (``check``).
Tiers: ``gpu`` is the compute device (the CPU on a CPU run), ``host`` pinned (or
pageable) host memory, ``nvme`` the rank's extent file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from tierlift.layout import Chunk
from tierlift.offload.activation_plan import ActivationPlan
from tierlift.offload.arena import ArenaPlan, ChunkShape, plan_arena
from tierlift.offload.extents import ExtentPlan, plan_extents, split_pieces
from tierlift.offload.nvme_state import DEFAULT_PIECE_NUMEL

__all__ = ["TIERS", "place_chunks", "param_tiers", "nvme_piece_numel", "nvme_extents", "ChunkPlan",
           "ExecutionPlan", "PlanMismatch", "build_execution_plan", "optimizer_tiers_for"]

TIERS = ("gpu", "host", "nvme")
_STATE_KINDS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum",)}


class PlanMismatch(RuntimeError):
    """The engine's actual placement differs from its plan: a bug, never bad input."""


def place_chunks(shard_numels: Sequence[int], max_in_cpu: int) -> tuple[str, ...]:
    """Optimizer tier of each chunk with NVMe offload: first-fit in the given (forward)
    order of ``max_in_cpu`` host elements (see the module docstring for why)."""
    left, out = int(max_in_cpu), []
    for n in shard_numels:
        if n <= left:
            left -= n
            out.append("host")
        else:
            out.append("nvme")
    return tuple(out)


def optimizer_tiers_for(optimizer_kind: str, shard_numels: Sequence[int], max_in_cpu: int = 0) -> tuple[str, ...]:
    """Optimizer tier per chunk for an ``offload.optimizer`` kind (none | cpu | nvme)."""
    if optimizer_kind == "none":
        return ("gpu",) * len(shard_numels)
    if optimizer_kind == "cpu":
        return ("host",) * len(shard_numels)
    if optimizer_kind == "nvme":
        return place_chunks(shard_numels, max_in_cpu)
    raise ValueError(f"optimizer kind {optimizer_kind!r} is not one of none, cpu, nvme")


def param_tiers(optimizer_tiers: Sequence[str], param_kind: str) -> tuple[str, ...]:
    """Where each chunk's compute-dtype shard lives between gathers.  ``cpu``: gathers
    copy it in from the host (the fp32 master of host-tier chunks, a compute-dtype
    copy of NVMe-tier ones); ``nvme``: NVMe-tier chunks read it from the extent file,
    host-tier chunks from their host master."""
    if param_kind == "none":
        return ("gpu",) * len(optimizer_tiers)
    if param_kind == "cpu":
        return ("host",) * len(optimizer_tiers)
    if param_kind == "nvme":
        return tuple("nvme" if t == "nvme" else "host" for t in optimizer_tiers)
    raise ValueError(f"param kind {param_kind!r} is not one of none, cpu, nvme")


def nvme_piece_numel(buffer_size: int, params_on_nvme: bool, compute_itemsize: int) -> int:
    """Elements per NVMe piece: pieces start 4 KiB-aligned (O_DIRECT straight into
    slices of full-chunk buffers) in fp32 state and, with parameters on NVMe, in the
    compute dtype too.  ``buffer_size`` 0: 16 Mi elements."""
    align = 4096 // min(4, compute_itemsize) if params_on_nvme else 1024
    return max(align, buffer_size // align * align) if buffer_size else DEFAULT_PIECE_NUMEL


def nvme_extents(shard_numels: Sequence[int], optimizer_name: str, piece_numel: int,
                 param_itemsize: int = 0) -> ExtentPlan:
    """The rank's extent file as ``offload/nvme_state.NVMeStateStore`` lays it out:
    every chunk's master and moments in pieces (any chunk may move to NVMe later),
    then the compute-dtype parameters when they live on NVMe (``param_itemsize`` > 0)."""
    kinds = ("master",) + _STATE_KINDS[optimizer_name]
    pieces = [split_pieces(n, piece_numel) for n in shard_numels]
    items = [((i, k, lo), (hi - lo) * 4) for i, ps in enumerate(pieces) for k in kinds for lo, hi in ps]
    if param_itemsize:
        items += [((i, "param", lo), (hi - lo) * param_itemsize) for i, ps in enumerate(pieces) for lo, hi in ps]
    return plan_extents(items)


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk on this rank: its layout and where each kind of state lives."""

    index: int
    unit: str            # module path of its wrap unit ("" = the root)
    padded_numel: int    # elements of the gathered chunk
    shard_numel: int     # elements of each rank's shard
    shard_lo: int        # this rank's shard is [shard_lo, shard_lo + shard_numel) of the chunk
    group: int           # the top-level unit (group) gathering it, in forward order; -1: none (root)
    persistent: bool     # stays gathered all run
    optimizer: str       # gpu | host | nvme: fp32 master and moments
    param: str           # gpu | host | nvme: the compute-dtype shard between gathers


@dataclass(frozen=True)
class ExecutionPlan:
    """What one rank's engine executes.  ``activations`` holds the activation plan
    (``offload/activation_plan.py``) once the executor has made one (it needs a
    profiling step, so it is None at construction); ``experts`` is reserved for MoE
    expert streaming: (expert chunk index, tier) pairs, empty until that planner exists."""

    rank: int
    world_size: int
    ranks_per_node: int
    zero_stage: int
    optimizer_kind: str                # none | cpu | nvme
    param_kind: str                    # none | cpu | nvme
    optimizer_name: str                # adamw | sgd
    chunks: tuple[ChunkPlan, ...]
    prefetch_units: int
    arena: ArenaPlan
    compute_itemsize: int              # bytes: the gathered dtype (arena slots)
    reduce_itemsize: int               # bytes: the gradient reduction dtype (arena slots)
    gpu: bool                          # the compute device is a GPU
    nvme_piece_numel: int = 0          # 0 without an NVMe tier
    nvme_extents: ExtentPlan | None = field(default=None, repr=False)
    host_budget_bytes: int = 0         # per rank; 0 = unbounded
    activations: ActivationPlan | None = None
    experts: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.ranks_per_node <= self.world_size:
            raise ValueError(f"ranks_per_node={self.ranks_per_node} outside [1, world_size={self.world_size}]")
        for c in self.chunks:
            if c.optimizer not in TIERS or c.param not in TIERS:
                raise ValueError(f"chunk {c.index}: tiers ({c.optimizer}, {c.param}) not in {TIERS}")

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.ranks_per_node)

    @property
    def host_budget_per_node_bytes(self) -> int:
        return self.host_budget_bytes * self.ranks_per_node

    @property
    def optimizer_tiers(self) -> tuple[str, ...]:
        return tuple(c.optimizer for c in self.chunks)

    @property
    def placement(self) -> tuple[tuple[str, str], ...]:
        """(optimizer tier, parameter tier) per chunk: what ``check`` compares."""
        return tuple((c.optimizer, c.param) for c in self.chunks)

    def with_prefetch(self, prefetch_units: int) -> "ExecutionPlan":
        """The same plan gathering ``prefetch_units`` units ahead (its arena re-planned)."""
        return replace(self, prefetch_units=int(prefetch_units),
                       arena=_arena(self.chunks, self.world_size, self.zero_stage, int(prefetch_units),
                                    self.compute_itemsize, self.reduce_itemsize, self.gpu and self.param_kind != "none"))

    def with_optimizer_tiers(self, tiers: Sequence[str]) -> "ExecutionPlan":
        """The same plan with chunks' optimizer state moved: host -> NVMe only, and only
        with an NVMe tier (its extents exist for every chunk); the engine frees host
        memory under pressure, it never pulls state back."""
        if len(tiers) != len(self.chunks):
            raise ValueError(f"{len(tiers)} tiers for {len(self.chunks)} chunks")
        for c, t in zip(self.chunks, tiers):
            if t != c.optimizer and ((c.optimizer, t) != ("host", "nvme") or self.optimizer_kind != "nvme"):
                raise ValueError(f"chunk {c.index}: optimizer state cannot move {c.optimizer} -> {t} "
                                 f"(only host -> nvme, with offload.optimizer kind nvme, not {self.optimizer_kind})")
        ps = param_tiers(tiers, self.param_kind)
        return replace(self, chunks=tuple(replace(c, optimizer=t, param=p) for c, t, p in zip(self.chunks, tiers, ps)))

    def moved_to_nvme(self, new: "ExecutionPlan") -> list[int]:
        return [a.index for a, b in zip(self.chunks, new.chunks) if (a.optimizer, b.optimizer) == ("host", "nvme")]

    def check(self, actual: Sequence[tuple[str, str]], when: str) -> None:
        """Raise PlanMismatch unless ``actual`` (per chunk: optimizer tier, parameter
        tier) is this plan's placement."""
        if len(actual) != len(self.chunks):
            raise PlanMismatch(f"{when}: the engine has {len(actual)} chunks, the plan {len(self.chunks)}")
        for c, got in zip(self.chunks, actual):
            if tuple(got) != (c.optimizer, c.param):
                raise PlanMismatch(f"{when}: chunk {c.index} ({c.unit or '(root)'}) is planned at optimizer="
                                   f"{c.optimizer}, param={c.param} but the engine has optimizer={got[0]}, "
                                   f"param={got[1]}")

    def to_dict(self) -> dict:
        ext = self.nvme_extents
        return {"rank": self.rank, "world_size": self.world_size, "ranks_per_node": self.ranks_per_node,
                "nodes": self.nodes, "zero_stage": self.zero_stage, "optimizer_kind": self.optimizer_kind,
                "param_kind": self.param_kind, "prefetch_units": self.prefetch_units,
                "host_budget_bytes": self.host_budget_bytes,
                "host_budget_per_node_bytes": self.host_budget_per_node_bytes,
                "chunks": [vars(c).copy() for c in self.chunks],
                "arena": [{"kind": s.kind.value, "nbytes": s.nbytes, "count": s.count, "stream": s.stream}
                          for s in self.arena.classes],
                "nvme_piece_numel": self.nvme_piece_numel,
                "nvme_extents": None if ext is None else {"file_bytes": ext.file_bytes, "extents": len(ext)},
                "activations": None if self.activations is None else self.activations.to_json(),
                "experts": [list(e) for e in self.experts]}

    def to_table(self) -> str:
        ext = self.nvme_extents
        rows = [f"execution plan (rank {self.rank} of {self.world_size}, {self.ranks_per_node} rank(s)/node on "
                f"{self.nodes} node(s)): prefetch {self.prefetch_units} unit(s); arena {self.arena.describe()}",
                "  host budget: " + ("unbounded" if not self.host_budget_bytes else
                                     f"{self.host_budget_bytes / 2**30:.2f} GiB per rank, "
                                     f"{self.host_budget_per_node_bytes / 2**30:.2f} GiB per node"),
                "  NVMe extents: " + ("none" if ext is None else
                                      f"{len(ext)} in {ext.file_bytes / 2**30:.2f} GiB per rank, pieces of "
                                      f"{self.nvme_piece_numel:,} elements"),
                f"  {'chunk':<6}{'unit':<32}{'shard':>12}{'offset':>14}  optimizer  params"]
        rows += [f"  {c.index:<6}{(c.unit or '(root)')[:31]:<32}{c.shard_numel:>12,}{c.shard_lo:>14,}  "
                 f"{c.optimizer:<9}  {c.param}" for c in self.chunks]
        return "\n".join(rows) + "\n"


def _groups(chunks: Sequence[Chunk]) -> list[int]:
    """Group of each chunk, as the engine forms them: top-level units in forward order,
    each carrying its nested units' chunks; -1 for the root."""
    names = [c.unit for c in chunks if c.unit]
    top = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    index = {n: g for g, n in enumerate(dict.fromkeys(top))}
    return [next((index[t] for t in index if c.unit == t or c.unit.startswith(t + ".")), -1) if c.unit else -1
            for c in chunks]


def _arena(chunks: Sequence[ChunkPlan], world_size: int, stage: int, prefetch_units: int, compute_itemsize: int,
           reduce_itemsize: int, shards_from_host: bool) -> ArenaPlan:
    """The GPU arena's slots (``offload/arena.py``), from the chunks as the engine groups
    them: a chunk churns unless it, or every chunk of its group, is persistent."""
    members: dict[int, list[bool]] = {}
    for c in chunks:
        members.setdefault(c.group, []).append(c.persistent)
    shapes = [ChunkShape(max(c.group, 0), c.padded_numel, c.shard_numel,
                         c.persistent or c.group < 0 or all(members[c.group])) for c in chunks]
    return plan_arena(shapes, world_size=world_size, stage=stage, prefetch_units=prefetch_units,
                      compute_itemsize=compute_itemsize, reduce_itemsize=reduce_itemsize,
                      gather_shards_from_host=shards_from_host)


def build_execution_plan(chunks: Sequence[Chunk], *, rank: int, world_size: int, ranks_per_node: int,
                         zero_stage: int, prefetch_units: int, optimizer_kind: str, param_kind: str,
                         optimizer_name: str, compute_itemsize: int, reduce_itemsize: int, gpu: bool,
                         max_in_cpu: int = 0, optimizer_tiers: Sequence[str] | None = None,
                         nvme_buffer_size: int = 0, host_budget_bytes: int = 0) -> ExecutionPlan:
    """The plan for ``chunks`` (a ``ChunkLayout``'s, forward order).  Optimizer tiers
    are ``optimizer_tiers`` when given (a planner's choice), else the placement rule
    over ``max_in_cpu``.  ``gpu``: the compute device is a GPU (gather shards copied
    in from the host take arena slots)."""
    chunks = list(chunks)
    numels = [c.shard_numel for c in chunks]
    tiers = tuple(optimizer_tiers) if optimizer_tiers is not None else \
        optimizer_tiers_for(optimizer_kind, numels, max_in_cpu)
    expected = {"none": {"gpu"}, "cpu": {"host"}, "nvme": {"host", "nvme"}}[optimizer_kind]
    if len(tiers) != len(chunks) or not set(tiers) <= expected:
        raise ValueError(f"optimizer tiers {tiers} do not fit offload.optimizer kind {optimizer_kind!r} "
                         f"over {len(chunks)} chunks")
    params, groups = param_tiers(tiers, param_kind), _groups(chunks)
    out = tuple(ChunkPlan(c.index, c.unit, c.padded_numel, c.shard_numel, rank * c.shard_numel, g, c.persistent,
                          t, p) for c, g, t, p in zip(chunks, groups, tiers, params))
    arena = _arena(out, world_size, zero_stage, prefetch_units, compute_itemsize, reduce_itemsize,
                   gpu and param_kind != "none")
    piece, extents = 0, None
    if optimizer_kind == "nvme":
        on_nvme = param_kind == "nvme"
        piece = nvme_piece_numel(nvme_buffer_size, on_nvme, compute_itemsize)
        extents = nvme_extents(numels, optimizer_name, piece, compute_itemsize if on_nvme else 0)
    return ExecutionPlan(rank, world_size, ranks_per_node, zero_stage, optimizer_kind, param_kind, optimizer_name,
                         out, prefetch_units, arena, compute_itemsize, reduce_itemsize, gpu, piece, extents,
                         host_budget_bytes)
