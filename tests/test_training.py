"""Training a new task in the subspace: zero start, only loadings learn, the loss falls, export matches PEFT."""

import pytest
import torch
import torch.nn.functional as F
from conftest import peft_logits, tiny_llama

from vlora import (
    SharedSubspace,
    SubspaceTrainer,
    TaskError,
    VLoRAError,
    VLoRAModel,
    export_task,
    load_adapter,
    orthogonal_init,
)

METHODS = ["flat", "rank"]


def store(dirs, method, k=64):
    return SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=k, method=method)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_init_starts_at_zero_and_keeps_every_stored_task(adapter_dirs, method, input_ids):
    subspace = store(adapter_dirs, method)
    model = VLoRAModel(tiny_llama(0), subspace)  # built before the basis grows: must keep working
    before = {}
    for task_id in subspace.task_ids:
        model.set_task(task_id)
        before[task_id] = logits(model, input_ids)
    ks = subspace.layer_ks

    task = orthogonal_init(subspace, "new_task")

    for task_id, expected in before.items():
        model.set_task(task_id)
        torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    model.set_task("new_task")
    assert torch.equal(logits(model, input_ids), logits(tiny_llama(0), input_ids))
    for name, (F_A, F_B) in subspace.task_factors("new_task").items():
        assert torch.count_nonzero(F_B) == 0 and F_A.norm() > 0
        for side in "AB":  # room to learn: new directions, unless the basis already spans everything
            k, D = subspace.bases[name][side].components.shape
            assert k > ks[name][side] or k == D
    assert task.config["r"] == 4 and subspace.tasks["new_task"] is task


def test_trainable_params_are_the_loading_entries(adapter_dirs):
    subspace = store(adapter_dirs, "flat", k=2)
    orthogonal_init(subspace, "new_task", num_new_components=3)
    trainer = SubspaceTrainer(subspace, "new_task", lr=1e-3)
    ks = subspace.layer_ks  # flat: one loading per direction, per layer and side
    assert trainer.num_trainable_params == sum(k for sides in ks.values() for k in sides.values())
    assert trainer.num_trainable_params == 4 * 2 * (2 + 3) + 4  # 4 layers x 2 sides x (k + new); B also gets its mean


@pytest.mark.parametrize("method", METHODS)
def test_training_halves_the_loss_and_leaves_the_base_untouched(adapter_dirs, method):
    """Distil a stored task into a fresh one: only loadings get gradients, the loss at least halves."""
    subspace = store(adapter_dirs[:3], method)
    model = VLoRAModel(tiny_llama(0), subspace)
    torch.manual_seed(3)
    batch = torch.randint(0, 128, (4, 16))
    model.set_task(subspace.task_ids[2])
    target = logits(model, batch)
    base_state = {k: v.clone() for k, v in model.base_model.state_dict().items()}

    orthogonal_init(subspace, "new_task")
    trainer = SubspaceTrainer(subspace, "new_task", lr=3e-2)
    model.set_task("new_task")
    losses = [trainer.step(F.mse_loss(model(batch).logits, target)) for _ in range(40)]

    assert losses[-1] <= 0.5 * losses[0]
    assert all(t.grad is not None for t in trainer.params)
    assert all(p.grad is None and not p.requires_grad for p in model.base_model.parameters())
    for key, value in model.base_model.state_dict().items():
        assert torch.equal(value, base_state[key]), key


def test_trained_task_saves_and_exports_to_the_same_peft_outputs(adapter_dirs, tmp_path, input_ids):
    subspace = store(adapter_dirs, "flat", k=3)
    model = VLoRAModel(tiny_llama(0), subspace)
    orthogonal_init(subspace, "new_task")
    model.set_task("new_task")  # pointed before the trainer exists: it still sees the trained tensors
    trainer = SubspaceTrainer(subspace, "new_task", lr=5e-2)
    for _ in range(5):
        trainer.step(model(input_ids).logits[..., 7].mean())  # push up one token: any loss with a gradient
    assert not torch.equal(logits(model, input_ids), logits(tiny_llama(0), input_ids))
    trainer.write_back()
    subspace.save(tmp_path / "store")

    loaded = SharedSubspace.load(tmp_path / "store")
    served = VLoRAModel(tiny_llama(0), loaded)
    served.set_task("new_task")
    torch.testing.assert_close(logits(served, input_ids), logits(model, input_ids), atol=1e-6, rtol=0)
    folder = export_task(loaded, "new_task", tmp_path / "exported")
    torch.testing.assert_close(peft_logits(folder, input_ids), logits(served, input_ids), atol=1e-4, rtol=0)


def test_hugging_face_trainer_trains_the_loadings(adapter_dirs, tmp_path):
    """HF Trainer drives our optimizer; the callback writes the loadings back when it ends."""
    from transformers import Trainer, TrainingArguments

    subspace = store(adapter_dirs, "flat", k=3)
    model = VLoRAModel(tiny_llama(0), subspace)
    orthogonal_init(subspace, "new_task")
    sub = SubspaceTrainer(subspace, "new_task", lr=5e-2)
    model.set_task("new_task")
    torch.manual_seed(4)
    ids = torch.randint(0, 128, (8, 12))
    data = [{"input_ids": row, "labels": torch.full_like(row, 5)} for row in ids]  # always say token 5
    with torch.no_grad():
        before = model(ids, labels=data[0]["labels"].expand_as(ids)).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=15,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        lr_scheduler_type="constant",
        remove_unused_columns=False,
    )  # VLoRAModel.forward takes **kwargs
    Trainer(
        model=model, args=args, train_dataset=data, optimizers=(sub.optimizer, None), callbacks=[sub.callback()]
    ).train()
    with torch.no_grad():
        after = model(ids, labels=data[0]["labels"].expand_as(ids)).loss.item()
    assert after < before - 0.05
    assert not any(t.requires_grad for t in sub.params)  # write_back ran at the end of training


def test_training_needs_an_initialised_task_and_a_connected_loss(adapter_dirs, input_ids):
    subspace = store(adapter_dirs, "flat", k=2)
    with pytest.raises(TaskError, match=r"not initialised.*orthogonal_init\(subspace, 'ghost'\)"):
        SubspaceTrainer(subspace, "ghost")
    orthogonal_init(subspace, "new_task")
    with pytest.raises(TaskError, match="already in this store"):
        orthogonal_init(subspace, "new_task")
    trainer = SubspaceTrainer(subspace, "new_task")
    model = VLoRAModel(tiny_llama(0), subspace)
    model.set_task(subspace.task_ids[0])  # the wrong task: the loss does not reach new_task's loadings
    with pytest.raises(VLoRAError, match=r"set_task\('new_task'\)"):
        trainer.step(model(input_ids).logits.mean())
    assert trainer.steps == 0
