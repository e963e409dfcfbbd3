"""Where and in what precision base models load: arguments, then $VLORA_DEVICE/$VLORA_DTYPE, then the machine."""

import pytest
import torch
from conftest import make_tiny_model

from vlora_core.base_model import fastest_cpu_dtype, load_base_model, placement
from vlora_core.errors import ModelLoadError


def test_placement_follows_arguments_then_environment_then_the_machine(monkeypatch):
    assert placement("cpu", "fp16") == (torch.device("cpu"), torch.float16)
    monkeypatch.setenv("VLORA_DTYPE", "bf16")
    assert placement("cpu") == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.delenv("VLORA_DTYPE")
    monkeypatch.delenv("VLORA_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    device, dtype = placement()
    assert device.type == expected and dtype in (torch.float32, torch.bfloat16)
    assert dtype == (torch.bfloat16 if expected == "cuda" else fastest_cpu_dtype())
    with pytest.raises(ModelLoadError, match="choose one of fp32, bf16, fp16"):
        placement("cpu", "int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU is present"):
            placement("cuda")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_models_load_straight_into_the_dtype_asked_for(tmp_path, dtype):
    model, tokenizer = load_base_model(make_tiny_model(tmp_path / "tiny"), dtype=dtype, device="cpu")
    wanted = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert {p.dtype for p in model.parameters()} == {wanted}
    assert not model.training and tokenizer.eos_token == "<eos>"
