"""The spec (docs/migration_from_peft.md, a copy of the user's spec) runs as written: every code block."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, write_adapter

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "migration_from_peft.md"
SHARED_SPEC = ROOT.parent / "shared" / "spec" / "migration_from_peft.md"


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", SPEC.read_text(), flags=re.S)


# The user's spec as copied into docs/; a new copy of the spec updates this digest with it.
SPEC_SHA256 = "21200e172f73a7d5fac273394cd3974eef1ab384190c951f6991a7bdb23ddbab"


def test_spec_copy_is_current():
    """The copy is the spec this code was written to, and (where the shared spec is beside the checkout,
    as in CI) still the user's current one."""
    copy = SPEC.read_bytes()
    assert hashlib.sha256(copy).hexdigest() == SPEC_SHA256
    if SHARED_SPEC.is_file():
        assert copy == SHARED_SPEC.read_bytes(), f"{SHARED_SPEC} changed: copy it to {SPEC} and update SPEC_SHA256"


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A folder laid out as in the spec: adapters/{sentiment,summarization,translation,new_task}."""
    for seed, name in enumerate(["sentiment", "summarization", "translation", "new_task"]):
        write_adapter(tmp_path / "adapters" / name, seed)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_shell(block, cwd):
    bin_dir = Path(sys.executable).parent  # the venv's bin, where `pip install -e .` put the `vlora` command
    assert (bin_dir / "vlora").is_file(), "the vlora command is not installed in this environment"
    result = subprocess.run(
        ["bash", "-ec", block],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow  # the vlora command in new processes
def test_step1_and_step2_commands_run_verbatim(workdir):
    compress, export, add = blocks("bash")[:3]
    assert compress.startswith("vlora compress") and export.startswith("vlora export") and add.startswith("vlora add")
    run_shell(compress, workdir)
    assert (workdir / "shared_subspace" / "manifest.json").is_file()
    run_shell(export, workdir)
    config = (workdir / "exported" / "sentiment" / "adapter_config.json").read_text()
    assert '"lora_alpha": 32' in config and '"base_model_name_or_path": "meta-llama/Llama-3-8B"' in config
    run_shell(add, workdir)
    from vlora import SharedSubspace

    assert SharedSubspace.load(workdir / "shared_subspace").task_ids == [
        "sentiment",
        "summarization",
        "translation",
        "new_task",
    ]


def test_step1_python_runs_verbatim(workdir):
    code = next(b for b in blocks("python") if "from_adapters" in b)
    exec(compile(code, str(SPEC), "exec"), {})
    from vlora import SharedSubspace

    assert SharedSubspace.load(workdir / "shared_subspace").task_ids == ["sentiment", "summarization", "translation"]


def test_switching_snippet_runs_verbatim(workdir):
    exec(compile(next(b for b in blocks("python") if "from_adapters" in b), str(SPEC), "exec"), {})
    code = next(b for b in blocks("python") if "set_task" in b)
    base_model = tiny_llama(0)
    input_ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        plain = base_model(input_ids).logits
    scope = {"base_model": base_model, "input_ids": input_ids}
    with torch.no_grad():
        exec(compile(code, str(SPEC), "exec"), scope)
    assert scope["model"].active_task == "translation"
    logits = getattr(scope["output"], "logits", scope["output"])
    assert not torch.allclose(logits, plain)


def test_training_snippet_runs_verbatim(workdir):
    exec(compile(next(b for b in blocks("python") if "from_adapters" in b), str(SPEC), "exec"), {})
    code = next(b for b in blocks("python") if "SubspaceTrainer" in b)
    from vlora import SharedSubspace, VLoRAModel

    torch.manual_seed(0)
    batches = [torch.randint(0, 128, (4, 10))] * 3  # one batch, three steps
    losses = []
    store = SharedSubspace.load("shared_subspace/")
    model = VLoRAModel(tiny_llama(0), store)  # built before the task exists, as a serving model would be

    class LoadedOnce(SharedSubspace):  # the snippet's SharedSubspace.load(...) gets the store the model serves
        @classmethod
        def load(cls, path):
            return store

    def compute_loss(model, batch):
        if model.active_task != "new_task" and "new_task" in model.available_tasks:
            model.set_task("new_task")
        loss = model(batch, labels=batch).loss
        losses.append(loss.item())
        return loss

    scope = {"SharedSubspace": LoadedOnce, "model": model, "dataloader": batches, "compute_loss": compute_loss}
    exec(compile(code, str(SPEC), "exec"), scope)
    assert scope["trainer"].num_trainable_params > 0 and len(losses) == 3
    assert losses[2] < losses[1] < losses[0]  # the loadings really trained
    assert "new_task" in SharedSubspace.load("shared_subspace/").task_ids
