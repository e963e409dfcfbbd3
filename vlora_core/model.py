"""VLoRAModel: one base model serving every task of a SharedSubspace.

Each targeted layer becomes a ``SubspaceLayer`` that holds the shared basis once, where the model is.
Switching tasks is a dict lookup plus one pointer move per layer: the layers are pointed at the task's
loadings (tiny tensors owned by the subspace); nothing is rebuilt, copied or reconstructed at the switch.
Each layer keeps the active task's two factors from its first forward after a switch (see ``layer``), made again
when the loadings change in place, so a ``SubspaceTrainer`` that trains those tensors in place is seen by every
model pointing at them.

    model = VLoRAModel(base_model, subspace)      # the tasks' own scaling; lora_alpha= overrides it
    model.set_task("sentiment"); model(input_ids)
    model(input_ids, task_ids=["sentiment", None])  # one task per row (None: the base model), one forward
    model.merge_task("sentiment"); ...; model.unmerge()  # zero-overhead serving of one task
"""

from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager

import torch
from torch import nn

from .adapter import check_alpha, lora_scaling
from .errors import CompatibilityError, VLoRAError, short_list
from .head import restride_head_input
from .layer import Rows, SubspaceLayer, layer_kind
from .methods import get_method
from .records import LayerShape, Task
from .subspace import SharedSubspace

log = logging.getLogger("vlora")


class VLoRAModel(nn.Module):
    """A base model serving every task of a SharedSubspace; a task switch moves pointers only.

    Args:
        base_model: a transformers model (or any module) with the layers the store targets; wrapped in place
            (``unload()`` gives it back unchanged) and frozen.
        subspace: the store (``SharedSubspace.load(...)``).
        lora_alpha: one lora_alpha for every task instead of each task's own config (None: their own).

    Example:
        >>> model = VLoRAModel(base_model, SharedSubspace.load("store/"), lora_alpha=32)
        >>> model.set_task("sentiment"); model(input_ids)
        >>> model(input_ids, task_ids=["sentiment", "translation"])  # a task per row, one forward
    """

    def __init__(self, base_model: nn.Module, subspace: SharedSubspace, lora_alpha: float | None = None):
        super().__init__()
        self.subspace = subspace
        if lora_alpha is not None:  # a finite positive number whose scaling fits every stored layer's rank
            lora_alpha = check_alpha(lora_alpha, "VLoRAModel(lora_alpha=...) (None: each task's own)")
            for task in subspace.tasks.values():  # checked before the base model is touched
                self._gains(task, lora_alpha)
        self._trainable = [p for p in base_model.parameters() if p.requires_grad]  # given back by unload()
        base_model.requires_grad_(False)  # only task loadings ever train
        self.base_model = base_model
        self.lora_alpha = lora_alpha  # None: each task's own alpha, rslora and alpha_pattern
        self.targets = wrap_layers(base_model, subspace)  # layer name -> SubspaceLayer (inside base_model)
        self._head_hook = restride_head_input(base_model)  # removed by unload()
        self._active: str | None = None
        self._merged: str | None = None

    # ---- tasks ------------------------------------------------------------------------------------
    @property
    def active_task(self) -> str | None:
        return self._active

    @property
    def merged_task(self) -> str | None:
        return self._merged

    @property
    def available_tasks(self) -> list[str]:
        return self.subspace.task_ids

    def set_task(self, task_id: str) -> None:
        """Point every layer at the task's loadings: O(layers) pointer moves, nothing computed."""
        task = self.subspace.task(task_id)  # unknown ids: TaskError listing the known ones
        self._refuse_while_merged(f"switch to task {task_id!r}")
        self._sync_bases()
        self._point(task)

    def clear_task(self) -> None:
        """Back to exactly the base model (a merged task is unmerged first)."""
        self.unmerge()
        for layer in self.targets.values():
            layer.point(None, None)
        self._active = None

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, *args, task_ids: list[str | None] | None = None, **kwargs):
        """The base model's forward; ``task_ids`` gives each row its own task (None: the base model)."""
        if task_ids is None:
            return self.base_model(*args, **kwargs)
        with self.tasks_per_row(task_ids, _batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, task_ids: list[str | None] | None = None, **kwargs):
        if task_ids is None:
            return self.base_model.generate(*args, **kwargs)
        with self.tasks_per_row(task_ids, _batch_size(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def tasks_per_row(self, task_ids: list[str | None], batch: int | None = None):
        """Within this block each input row runs its own task: the basis once, then each row's loadings."""
        ids = list(task_ids)
        if batch is not None and len(ids) != batch:
            raise VLoRAError(
                f"{len(ids)} task ids for a batch of {batch} rows; give one task id "
                "(or None for the base model) per row of input_ids."
            )
        self._refuse_while_merged("run a batch with task_ids")
        distinct = list(dict.fromkeys(ids))
        tasks = [None if t is None else self.subspace.task(t) for t in distinct]
        self._sync_bases()
        index = torch.tensor([distinct.index(t) for t in ids])  # (B,)
        gains = [{} if t is None else self._gains(t) for t in tasks]
        for name, layer in self.targets.items():
            layer.rows = self._rows(name, tasks, gains, index)
        try:
            yield self
        finally:
            for layer in self.targets.values():
                layer.rows = None

    # ---- merging ----------------------------------------------------------------------------------
    def merge_task(self, task_id: str) -> None:
        """Add the task's ΔW into the base weights: zero overhead until ``unmerge()``."""
        self.unmerge()
        self.set_task(task_id)
        for layer in self.targets.values():
            layer.merge()
        self._merged = task_id

    def unmerge(self) -> None:
        """Undo ``merge_task``: the base weights are exactly what they were before, in any dtype."""
        if self._merged is None:
            return
        for layer in self.targets.values():
            layer.unmerge()
        self._merged = None

    def unload(self) -> nn.Module:
        """Give the base model back as it was: its own layers in place of the subspace layers, every weight
        bit for bit (a merged task is unmerged first), its parameters' ``requires_grad`` restored.
        This VLoRAModel holds no layers afterwards. (PEFT's ``unload`` has the same meaning.)"""
        self.unmerge()
        for name, layer in self.targets.items():
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer.base)
        for p in self._trainable:
            p.requires_grad_(True)
        if self._head_hook is not None:
            self._head_hook.remove()
        self.targets, self._active, self._trainable, self._head_hook = {}, None, [], None
        return self.base_model

    # ---- internals --------------------------------------------------------------------------------
    def _point(self, task: Task) -> None:
        if task.extras and task.id != self._active:
            log.warning(
                "task %r carries %d non-LoRA tensors (modules_to_save); VLoRAModel applies only its "
                "LoRA layers — export the task for the full PEFT behaviour.",
                task.id,
                len(task.extras),
            )
        gains = self._gains(task)
        for name, layer in self.targets.items():
            sides = task.loadings[name]
            layer.point(sides["A"], sides["B"], gains.get(name, 1.0))
        self._active = task.id

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.half()``...: the bases move with the model; the active task's loadings follow."""
        super()._apply(fn, *args, **kwargs)
        if self._active is not None and self._merged is None:
            self._point(self.subspace.tasks[self._active])
        return self

    def _sync_bases(self) -> None:
        """Re-cut a layer's projections if its basis object changed (e.g. grown by orthogonal_init)."""
        stale = [name for name, layer in self.targets.items() if not layer.cut_from(**self.subspace.bases[name])]
        for name in stale:
            self.targets[name].use_bases(**self.subspace.bases[name])
        if stale and self._active is not None:  # the old loadings belong to the old basis: re-point
            if self._active in self.subspace.tasks:
                self._point(self.subspace.tasks[self._active])
            else:
                self.clear_task()

    def _gains(self, task: Task, lora_alpha: float | None = None) -> dict[str, float]:
        """Per layer: the override scaling over the task's own (already folded into its factors)."""
        lora_alpha = self.lora_alpha if lora_alpha is None else lora_alpha
        if lora_alpha is None:
            return {}
        override = {**task.config, "lora_alpha": lora_alpha, "alpha_pattern": {}}
        source, own = f"VLoRAModel(lora_alpha={lora_alpha:g})", f"task {task.id!r}"
        return {
            name: lora_scaling(override, name, s.rank, source) / lora_scaling(task.config, name, s.rank, own)
            for name, s in self.subspace.shapes.items()
        }

    def _rows(self, name: str, tasks: list[Task | None], gains: list[dict], index: torch.Tensor) -> Rows:
        shape = self.subspace.shapes[name]
        P_A, g = self.targets[name].P_A, get_method(self.subspace.method).vectors_per_factor(shape.d_in, shape.rank)

        def stacked(side: str) -> torch.Tensor:  # (n, g, k); zeros where a row runs the base model
            zero = torch.zeros(g, self.subspace.bases[name][side].k)
            return torch.stack([zero if t is None else t.loadings[name][side] for t in tasks]).to(P_A.device)

        gain = torch.tensor([0.0 if t is None else own.get(name, 1.0) for t, own in zip(tasks, gains)]).to(P_A)
        return Rows(stacked("A"), stacked("B"), gain[:, None, None], index.to(P_A.device))  # gain (n, 1, 1)

    def _refuse_while_merged(self, action: str) -> None:
        if self._merged is not None:
            raise VLoRAError(
                f"cannot {action}: task {self._merged!r} is merged into the base weights; call unmerge() first."
            )

    def __getattr__(self, name: str):
        """Anything else (config, device, generation_config, ...) is the base model's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def __repr__(self) -> str:
        return (
            f"VLoRAModel({type(self.base_model).__name__}, layers={len(self.targets)}, "
            f"tasks={len(self.subspace.tasks)}, active={self._active!r}, merged={self._merged!r})"
        )


# ---- wrapping the base model ----------------------------------------------------------------------
def wrap_layers(model: nn.Module, subspace: SharedSubspace) -> dict[str, SubspaceLayer]:
    """Replace each stored layer of ``model`` by a SubspaceLayer around it, after checking they all fit."""
    modules = dict(model.named_modules())
    check_targets(modules, subspace.shapes)
    wrapped = {}
    for name, shape in subspace.shapes.items():
        layer = SubspaceLayer(modules[name], shape, subspace.method)
        layer.use_bases(**subspace.bases[name])
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, layer)
        wrapped[name] = layer
    return wrapped


def check_targets(modules: dict[str, nn.Module], shapes: dict[str, LayerShape]) -> None:
    missing = [name for name in shapes if name not in modules]
    if missing:
        raise CompatibilityError(
            f"the store targets {len(missing)} layers this model lacks: {short_list(missing, limit=4)}; nearest names in "
            f"the model: {short_list(_nearest(missing, modules), limit=4)}. The store was made for another model — "
            "load the base model its adapters were trained on."
        )
    problems = [_layer_problem(name, modules[name], shape) for name, shape in shapes.items()]
    problems = [p for p in problems if p]
    if problems:
        raise CompatibilityError(
            f"{short_list(problems, limit=3, sep='; ')}. The store was made for another base model (another hidden "
            "size or architecture) — load the base model its adapters were trained on."
        )


def _layer_problem(name: str, module: nn.Module, shape: LayerShape) -> str | None:
    if isinstance(module, SubspaceLayer):
        return f"{name} already belongs to a VLoRAModel (reuse that one, or pass a fresh base model)"
    kind = layer_kind(module)
    if kind is None:
        return f"{name} is a {type(module).__name__}, not a linear or Conv1D layer"
    d_in, d_out = kind.features(module)
    if (d_in, d_out) != (shape.d_in, shape.d_out):
        return f"{name} is {d_out}x{d_in} (d_out x d_in) in this model but {shape.d_out}x{shape.d_in} in the store"
    return None


def _nearest(missing: list[str], modules: dict[str, nn.Module]) -> list[str]:
    candidates = [name for name, module in modules.items() if layer_kind(module) is not None]
    found = []
    for name in missing[:3]:
        found += [n for n in difflib.get_close_matches(name, candidates, n=2, cutoff=0.4) if n not in found]
    return found


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    return inputs.shape[0] if isinstance(inputs, torch.Tensor) else None
