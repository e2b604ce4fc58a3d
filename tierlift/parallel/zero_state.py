"""State access of the ZeRO engine: consolidated weights, checkpoint segments,
counters, debug checks.  A mixin of :class:`tierlift.parallel.zero.ZeroEngine`,
kept apart so the step machinery and the state contract (docs/CONTRACTS.md) each
read as one concept."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tierlift.offload.optimizer_state import Tier
from tierlift.parallel.chunks import RuntimeChunk
from tierlift.parallel.comm import all_gather_flat
from tierlift.state import StateSegment

__all__ = ["EngineStateMixin"]


class EngineStateMixin:
    # -- state ---------------------------------------------------------------
    def _check_gathered(self, c: RuntimeChunk) -> None:
        """debug_sync: this rank's slice of the gathered buffer is its own shard, and
        the gathered buffer is bit-identical across ranks (compared by checksum)."""
        lo, hi = c.spec.shard_range(self.rank)
        if c.compute_shard is not None and not torch.equal(c.full[lo:hi], c.compute_shard):
            raise RuntimeError(f"[rank {self.rank}] debug_sync: gathered chunk {c.spec.index} ({c.spec.unit!r}) "
                               f"does not hold this rank's shard at [{lo}, {hi}).")
        s = c.full.double().sum().reshape(1)
        sums = [torch.zeros_like(s) for _ in range(self.world_size)]
        dist.all_gather(sums, s) if self.world_size > 1 else sums.__setitem__(0, s)
        if any(float(x) != float(s) for x in sums):
            raise RuntimeError(f"[rank {self.rank}] debug_sync: gathered chunk {c.spec.index} ({c.spec.unit!r}) "
                               f"differs across ranks: {[float(x) for x in sums]}")

    @torch.no_grad()
    def full_state_dict(self, to_rank0: bool = True) -> dict[str, torch.Tensor]:
        """Consolidated fp32 parameters on CPU (all ranks take part; rank 0 returns them)."""
        out: dict[str, torch.Tensor] = {}
        for c in self.chunks:
            master = self._master_of(c)
            full = torch.empty(c.spec.padded_numel, dtype=torch.float32, device=master.device)
            if self.world_size > 1:
                all_gather_flat(full, master)
            else:
                full.copy_(master)
            if self.rank == 0 or not to_rank0:
                cpu = full.cpu()
                for slot in c.spec.params:
                    out[slot.name] = cpu[slot.offset:slot.end].view(slot.shape).clone()
        for alias, name in self.aliases().items():
            if name in out:
                out[alias] = out[name]
        return out

    def aliases(self) -> dict[str, str]:
        """Tied parameters: every state_dict name that shares a stored parameter."""
        canonical = {id(p): n for c in self.chunks for n, p in zip((s.name for s in c.spec.params), c.params)}
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            cn = canonical.get(id(p))
            if cn is not None and cn != name:
                out[name] = cn
        return out

    # -- checkpoint contract (docs/CONTRACTS.md) -------------------------------
    def close(self) -> None:
        """Stop the host optimizer's worker, close NVMe files and release pinned memory."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.host_opt is not None:
            self.host_opt.close()

    def _master_of(self, c: RuntimeChunk) -> torch.Tensor:
        return c.master if self.host_opt is None else self.host_opt.chunk_state(c.spec.index)[0]

    def _chunk_state(self, c: RuntimeChunk) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.host_opt is not None:
            return self.host_opt.chunk_state(c.spec.index)
        i = c.spec.index
        return c.master, {k: self.optimizer.state[k][i] for k in self.optimizer.kinds}

    def state_segments(self) -> list:
        """This rank's pieces of every parameter with their fp32 state, as writable views.
        NVMe-tier chunks give ``StreamedTensor``s instead: a checkpoint streams them
        through one cached piece per kind, never the whole state in RAM (see
        docs/offload.md).  ``load_extra_state`` writes loaded values back to their tier."""
        out = []
        self._loaded, self._streamed = [], []
        for c in self.chunks:
            on_nvme = self.host_opt is not None and self.host_opt.chunks[c.spec.index].tier is Tier.NVME
            if on_nvme:
                self._streamed.append(c)
            else:
                master, states = self._chunk_state(c)
                self._loaded.append((c, master, states))
            for s in c.spec.segments(self.rank):
                if on_nvme:
                    tensors = self.host_opt.streamed_state(c.spec.index, s.shard_lo, s.shard_hi)
                else:
                    tensors = {"param": master[s.shard_lo:s.shard_hi]}
                    for kind, buf in states.items():
                        tensors[kind] = buf[s.shard_lo:s.shard_hi]
                out.append(StateSegment(s.param.name, s.param.shape, s.param_lo, s.param_hi, tensors))
        return out

    def finish_state_segments(self, loaded: bool) -> None:
        """After a checkpoint used ``state_segments``: write back streamed state (and, when
        ``loaded``, rebuild the compute-dtype copies of NVMe-tier chunks)."""
        if self.host_opt is not None:
            self.host_opt.finish_streamed([c.spec.index for c in getattr(self, "_streamed", [])] if loaded else [])
        self._streamed = []

    @property
    def step_count(self) -> int:
        return (self.host_opt or self.optimizer).step_count

    def extra_state(self) -> dict:
        return {"optimizer": self.optim_cfg.name, "optimizer_step": self.step_count,
                "loss_scaler": self.scaler.state_dict()}

    def load_extra_state(self, d: dict) -> None:
        """After the segments were filled from a checkpoint: restore counters, store
        offloaded state back to its tier and rebuild compute-dtype parameters."""
        if self.host_opt is not None:
            self.host_opt.step_count = int(d["optimizer_step"])
            for c, master, states in getattr(self, "_loaded", []):
                self.host_opt.commit_chunk_state(c.spec.index, master, states)
                c.stale = True
            for c in getattr(self, "_streamed", []):
                c.stale = True
            self.finish_state_segments(loaded=True)
        else:
            self.optimizer.step_count = int(d["optimizer_step"])
            self.optimizer.sync_step_tensors()
        self._loaded = []
        self.scaler.load_state_dict(d["loss_scaler"])
        self.refresh_params()
