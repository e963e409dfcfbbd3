"""Training a new task inside the subspace: only its loadings learn, the basis and the base model stay frozen.

    orthogonal_init(subspace, "new_task")        # ΔW exactly zero, basis widened with room to learn
    trainer = SubspaceTrainer(subspace, "new_task", lr=1e-3)
    for batch in dataloader:
        loss = compute_loss(model, batch)        # model: a VLoRAModel with "new_task" active
        trainer.step(loss)
    trainer.write_back(); subspace.save(path)

Like LoRA (A random, B zero), the new task starts with a random A-side factor and a B-side factor that is
exactly zero. The flat basis reconstructs F = mean + loadings · components, so zero is representable
only once the B side's mean joins its components (mean set to 0; stored tasks are re-expressed, as
``basis.extend`` does). ``orthogonal_init`` also adds directions orthogonal to each basis, so the new
task can leave the span of the stored tasks. The trainer makes the task's loading tensors leaves that
require grad, in place, so every VLoRAModel pointing at them trains them.
"""

from __future__ import annotations

import logging

import torch

from .basis import Basis, unformed_energy
from .compress import new_task_id
from .constants import SIDES
from .errors import TaskError, VLoRAError
from .precision import get_precision
from .records import Task
from .subspace import SharedSubspace

log = logging.getLogger("vlora")

DEFAULT_NEW_COMPONENTS = 4  # directions orthogonal_init adds per layer and side: room to learn
_RTOL = 1e-5  # a direction whose residual is below this share of its norm is already in the span


def orthogonal_init(
    subspace: SharedSubspace, task_id: str, num_new_components: int = DEFAULT_NEW_COMPONENTS, *, seed: int = 0
) -> Task:
    """Add task ``task_id`` with ΔW = 0 exactly, on bases widened by ``num_new_components`` new directions.

    Args:
        subspace: the store to add the task to (changed in place; its stored tasks keep their ΔW exactly).
        task_id: the new task's id (free in the store).
        num_new_components: directions added per layer and side, orthogonal to the stored ones: room to learn.
        seed: for the random A-side loadings and directions.

    Returns:
        The new Task; train it with ``SubspaceTrainer(subspace, task_id)``.

    Example:
        >>> orthogonal_init(subspace, "new_task"); trainer = SubspaceTrainer(subspace, "new_task", lr=1e-3)
    """
    task_id = new_task_id(subspace.tasks, task_id)
    if not subspace.tasks:
        raise VLoRAError("orthogonal_init needs a store with at least one task (its config is the template).")
    if isinstance(num_new_components, bool) or not isinstance(num_new_components, int) or num_new_components < 0:
        raise VLoRAError(
            f"num_new_components must be a whole number >= 0, got {num_new_components!r}; "
            f"for example {DEFAULT_NEW_COMPONENTS}."
        )
    generator = torch.Generator().manual_seed(seed)
    stored = list(subspace.tasks.values())
    loadings = {}
    for name in subspace.shapes:
        loadings[name] = {}
        for side in SIDES:
            basis = subspace.bases[name][side]
            old = torch.stack([t.loadings[name][side] for t in stored])  # (N, g, k)
            zero_side = side == "B"
            basis, new = widen(basis, old, num_new_components, generator, zero_mean=zero_side)
            subspace.bases[name][side] = basis
            for task, rows in zip(stored, new):
                task.loadings[name][side] = rows
            loadings[name][side] = torch.zeros_like(new[0]) if zero_side else random_loadings(new, generator)
    task = Task(task_id, loadings, new_task_config(subspace), source="orthogonal_init", dtype="float32")
    subspace.tasks[task.id] = task
    return task


def widen(
    basis: Basis, loadings: torch.Tensor, num_new: int, generator: torch.Generator, *, zero_mean: bool = False
) -> tuple[Basis, torch.Tensor]:
    """Grow a basis by random orthonormal directions (and, with ``zero_mean``, by its mean).

    loadings (N, g, k) of the stored tasks -> the new basis and their loadings (N, g, k'), re-expressed so
    that every task reconstructs as before. The result is rotated to principal axes, like ``extend``.
    """
    N, g, k = loadings.shape
    P = basis.components  # (k, D)
    X = loadings.reshape(N * g, k) @ P  # (N·g, D) stored vectors, centred
    mean = basis.mean
    if zero_mean and mean is not None:
        X, mean = X + mean, torch.zeros_like(mean)  # the mean becomes an ordinary direction
    candidates = torch.randn(num_new, P.shape[1], generator=generator)  # (m, D)
    if zero_mean and basis.mean is not None:
        candidates = torch.cat([basis.mean[None], candidates])
    E = torch.cat([P, orthonormal_complement(P, candidates)])  # (k', D)
    Z = X @ E.T  # (N·g, k')
    _, S, Hh = torch.linalg.svd(Z, full_matrices=True)  # rotate to principal axes; Hh (k', k')
    values = torch.cat([S, S.new_zeros(len(E) - len(S)), basis.spectrum[k:]])
    spectrum = values.sort(descending=True).values
    energy = None if basis.energy is None else float(values.double().pow(2).sum()) + unformed_energy(basis)
    widened = Basis(components=(Hh @ E).contiguous(), spectrum=spectrum, mean=mean, energy=energy)
    return widened, (Z @ Hh.T).reshape(N, g, -1)


def orthonormal_complement(P: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows (m', D) spanning what ``candidates`` (m, D) add to the row space of P (k, D)."""
    Q = candidates.float()
    for _ in range(2):  # twice is enough for Gram-Schmidt in fp32
        Q = Q - (Q @ P.T) @ P
    room = max(0, P.shape[1] - P.shape[0])
    Q_, R = torch.linalg.qr(Q.T)  # (D, m), (m, m)
    keep = R.diagonal().abs() > _RTOL * Q.norm(dim=1).max().clamp(min=1e-30)
    Q_ = Q_.T[keep][:room]  # (m', D)
    return Q_ - (Q_ @ P.T) @ P  # one more pass against P for orthogonality


def random_loadings(stored: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(g, k) random loadings whose rows have the typical norm of the stored tasks' rows (N, g, k)."""
    g, k = stored.shape[1:]
    typical = stored.pow(2).sum(-1).mean().sqrt().item() or 1.0
    L = torch.randn(g, k, generator=generator)
    return L / L.norm(dim=-1, keepdim=True).clamp(min=1e-12) * typical


def new_task_config(subspace: SharedSubspace) -> dict:
    """The first stored task's adapter_config.json, without its modules_to_save (the new task has none)."""
    config = dict(next(iter(subspace.tasks.values())).config)
    config["modules_to_save"] = None
    return config


class SubspaceTrainer:
    """Trains one task's loadings (k numbers per layer and side) with a torch optimizer."""

    def __init__(
        self,
        subspace: SharedSubspace,
        task_id: str,
        lr: float = 1e-3,
        *,
        optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
        **optimizer_kwargs,
    ):
        if task_id not in subspace.tasks:
            known = ", ".join(repr(t) for t in subspace.tasks) or "none"
            raise TaskError(
                f"task {task_id!r} is not initialised in this store (it holds: {known}); start it "
                f"with orthogonal_init(subspace, {task_id!r}) before training."
            )
        self.subspace, self.task_id = subspace, task_id
        task = subspace.tasks[task_id]
        self.params = [t.requires_grad_(True) for sides in task.loadings.values() for t in sides.values()]
        self.optimizer = optimizer(self.params, lr=lr, **optimizer_kwargs)
        self.steps = 0
        self.rounding = 0.0  # relative change of the loadings when write_back stores them in the store's precision

    @property
    def num_trainable_params(self) -> int:
        return sum(t.numel() for t in self.params)

    def step(self, loss: torch.Tensor) -> float:
        """Backpropagate ``loss`` into the loadings and take one optimizer step; returns the loss."""
        if not loss.requires_grad:
            raise self._not_connected()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if all(t.grad is None for t in self.params):
            raise self._not_connected()
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def write_back(self) -> Task:
        """End training: the trained loadings (already in the subspace) stop taking gradients.

        Training runs in float32; a store of lower precision (``subspace.dtype``) then holds the loadings
        rounded to it, and ``rounding`` says what that cost: the relative change of the task's loadings."""
        for t in self.params:
            t.grad = None
            t.requires_grad_(False)
        task = self.subspace.tasks[self.task_id]
        task.errors = {}  # any recorded error was against an adapter this task no longer is
        trained = torch.cat([t.flatten() for sides in task.loadings.values() for t in sides.values()])
        rule = get_precision(self.subspace.dtype)
        with torch.no_grad():  # in place: a VLoRAModel holding these tensors runs what is stored
            for sides in task.loadings.values():
                for t in sides.values():
                    t.copy_(rule.round_trip(t))
        stored = torch.cat([t.flatten() for sides in task.loadings.values() for t in sides.values()])
        self.rounding = ((stored - trained).norm() / trained.norm().clamp(min=1e-30)).item()
        if self.rounding > 0:
            log.info(f"task {self.task_id!r} stored in {self.subspace.dtype}: loadings moved by {self.rounding:.2e}")
        return task

    def callback(self):
        """A transformers ``TrainerCallback`` that calls ``write_back`` when a Hugging Face Trainer ends.

        Trainer(model=vlora_model, args=TrainingArguments(..., remove_unused_columns=False),
                optimizers=(trainer.optimizer, None), callbacks=[trainer.callback()])

        (``remove_unused_columns=False`` because VLoRAModel.forward passes ``**kwargs`` to the base model.)
        """
        from transformers import TrainerCallback

        trainer = self

        class WriteBack(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                trainer.write_back()

        return WriteBack()

    def _not_connected(self) -> VLoRAError:
        return VLoRAError(
            f"the loss does not depend on task {self.task_id!r}'s loadings; compute it with a "
            f"VLoRAModel on this store after model.set_task({self.task_id!r})."
        )

    def __repr__(self) -> str:
        return f"SubspaceTrainer(task={self.task_id!r}, params={self.num_trainable_params}, steps={self.steps})"
