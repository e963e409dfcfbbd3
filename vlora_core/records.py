"""The plain records a store is made of: a layer's shape and a task. No math, no files.

LayerShape   d_in, d_out and rank of one targeted layer (the same in every task of a store)
Task         one adapter in the store: its loadings on the shared basis, its own config and extras
Factors      a layer's canonical factors F_A (N, d_in, r), F_B (N, d_out, r), scaling folded in
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .adapter import LoRAAdapter
from .errors import MAX_TASK_ID, TaskError, check_task_id  # noqa: F401  (torch-free, for the manifest)

Factors = tuple[torch.Tensor, torch.Tensor]  # F_A (N, d_in, r), F_B (N, d_out, r)
Loadings = dict[str, dict[str, torch.Tensor]]  # layer -> side -> (g, k)
LayerKs = dict[str, dict[str, int]]  # layer -> side -> k


@dataclass(frozen=True)
class LayerShape:
    d_in: int
    d_out: int
    rank: int

    def dim(self, side: str) -> int:
        return self.d_in if side == "A" else self.d_out


@dataclass
class Task:
    """One adapter as the store holds it: loadings on the shared basis plus what export needs back."""

    id: str
    loadings: Loadings  # layer -> side -> (g, k)
    config: dict  # the adapter's own adapter_config.json
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save and other tensors
    source: str = ""  # where it came from, for messages
    dtype: str = "float32"  # the original factors' dtype; exports are cast back to it
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (ΔW rel. error, ‖ΔW‖)
    # layer -> (‖(ΔW − ΔŴ)·C^½‖ / ‖ΔW·C^½‖, ‖ΔW·C^½‖): the activation-weighted error of a calibrated fit
    act_errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_adapter(cls, adapter: LoRAAdapter, task_id: str) -> Task:
        """A task for ``adapter`` with no loadings yet (fitting or projecting fills them in)."""
        return cls(task_id, {}, adapter.config, adapter.extras, adapter.source, adapter.dtype)

    def bare(self) -> Task:
        """The same task without loadings or errors."""
        return replace(self, loadings={}, errors={}, act_errors={})

    def cut(self, ks: LayerKs) -> Task:
        """The task with its loadings cut to ``ks`` directions (copies, so the rest can be freed)."""
        loadings = {n: {s: t[..., : ks[n][s]].clone() for s, t in sides.items()} for n, sides in self.loadings.items()}
        return replace(self, loadings=loadings, errors=dict(self.errors), act_errors=dict(self.act_errors))

    def padded(self, ks: LayerKs) -> Task:
        """The task with zero loadings past its own k, up to ``ks``: on a basis that starts with this task's
        directions (the untruncated one it was cut from) it stands for the same ΔW."""
        loadings = {
            n: {s: torch.nn.functional.pad(t, (0, ks[n][s] - t.shape[-1])) for s, t in sides.items()}
            for n, sides in self.loadings.items()
        }
        return replace(self, loadings=loadings)
