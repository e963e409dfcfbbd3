"""A basis method is one table entry: a toy third method, defined in this file only, runs the whole path
(compress → store → export → PEFT, and VLoRAModel's single-task, mixed-batch and merged forwards)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import peft_logits, tiny_llama

from vlora import SharedSubspace, VLoRAError, VLoRAModel, export_task, load_adapter
from vlora_core import methods
from vlora_core.config import CompressConfig

# Rank columns, like "rank", but centred: P = [mean; components] (1+k, d), E = [1, L] (r, 1+k).
TOY = methods.Method(
    name="rank-centred",
    summary="rank columns, centred PCA",
    k_limit="N x r - 1 for the centred rank basis",
    centre=True,
    to_vectors=lambda F_: F_.transpose(1, 2),
    from_vectors=lambda V, d, r: V.transpose(1, 2),
    projection=lambda basis, d, r: torch.cat([basis.mean[None], basis.components]),
    expand=lambda L, r: F.pad(L, (1, 0), value=1.0),
    factor=lambda L, P, r: F.pad(L, (1, 0), value=1.0) @ P,
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, TOY.name, TOY)
    return TOY.name


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def test_toy_method_runs_every_path(toy, adapter_dirs, input_ids, tmp_path):
    adapters = [load_adapter(d) for d in adapter_dirs]
    ids = [a.name for a in adapters]
    full = SharedSubspace.from_adapters(adapters, num_components=100, method=toy)  # clipped to N·r − 1 = 15
    assert {k for sides in full.layer_ks.values() for k in sides.values()} == {15}
    assert "N x r - 1 for the centred rank basis" in full.clipping_note()

    store = SharedSubspace.load(full.save(tmp_path / "store"))
    assert store.method == toy
    model = VLoRAModel(tiny_llama(0), store)
    for task_id, folder in zip(ids, adapter_dirs):
        exported = export_task(store, task_id, tmp_path / "out" / task_id)
        expected = peft_logits(folder, input_ids)  # lossless at full k: the original adapter's logits
        torch.testing.assert_close(peft_logits(exported, input_ids), expected, atol=1e-4, rtol=0)
        model.set_task(task_id)
        torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-4, rtol=0)

    # k = 3: the model's single-task and mixed-batch forwards equal the truncated store's PEFT export
    cut = full.truncated(3)
    model = VLoRAModel(tiny_llama(0), cut)
    rows = [ids[0], None]
    mixed = logits(model, input_ids, task_ids=rows)
    exported = peft_logits(export_task(cut, ids[0], tmp_path / "cut"), input_ids)
    torch.testing.assert_close(mixed[0], exported[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], logits(tiny_llama(0), input_ids)[1], atol=1e-5, rtol=0)
    model.merge_task(ids[0])
    torch.testing.assert_close(logits(model, input_ids), exported, atol=1e-4, rtol=0)


def test_unknown_method_lists_the_known_ones(toy):
    with pytest.raises(VLoRAError, match=r"unknown method 'nope'; choose one of: flat, rank, rank-centred"):
        CompressConfig(4, "nope")
    with pytest.raises(VLoRAError, match="choose one of"):
        methods.get_method("nope")
