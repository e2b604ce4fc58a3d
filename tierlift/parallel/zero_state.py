"""State access of the ZeRO engine: consolidated weights, checkpoint segments, counters.
Owned by :class:`tierlift.parallel.zero.ZeroEngine`, which hands its methods out as its
own (the state contract, docs/CONTRACTS.md)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tierlift.offload.optimizer_state import Tier
from tierlift.parallel.chunks import RuntimeChunk
from tierlift.parallel.comm import all_gather_flat
from tierlift.parallel.optim import LossScaler
from tierlift.state import StateSegment

__all__ = ["EngineState"]


class EngineState:
    """What checkpoints and consolidation read and write of an engine's chunks: the fp32
    masters and optimizer state, on the device (``optimizer``) or the host optimizer."""

    def __init__(self, *, model: nn.Module, chunks: list[RuntimeChunk], host_opt, optimizer, optim_cfg,
                 scaler: LossScaler, refresh_params: Callable[[], None], rank: int, world_size: int) -> None:
        self.model, self.chunks, self.host_opt, self.optimizer = model, chunks, host_opt, optimizer
        self.optim_cfg, self.scaler, self.refresh_params = optim_cfg, scaler, refresh_params
        self.rank, self.world_size = rank, world_size
        # Between state_segments() and the matching finish / load: chunks whose state was
        # handed out as views (with the views) and chunks streamed from NVMe.
        self._loaded: list[tuple[RuntimeChunk, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._streamed: list[RuntimeChunk] = []

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
            self.host_opt.finish_streamed([c.spec.index for c in self._streamed] if loaded else [])
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
            for c, master, states in self._loaded:
                self.host_opt.commit_chunk_state(c.spec.index, master, states)
            self.finish_state_segments(loaded=True)
        else:
            self.optimizer.step_count = int(d["optimizer_step"])
            self.optimizer.sync_step_tensors()
        self._loaded = []
        self.scaler.load_state_dict(d["loss_scaler"])
        self.refresh_params()  # with the optimizer on the host: every chunk ON_HOST, regathered from the new values
