"""vlora_core: many PEFT LoRA adapters as one shared basis plus small per-task loadings.

Names are imported on first use (PEP 562), so ``import vlora_core`` (and the `vlora` command's parser) needs no
torch; ``from vlora_core import SharedSubspace`` and ``from vlora_core import *`` work as before.
"""

from importlib import import_module

_WHERE = {  # public name -> the module that defines it
    "LoRAAdapter": ".adapter",
    "LoRALayer": ".adapter",
    "CompressConfig": ".config",
    "AdapterError": ".errors",
    "CompatibilityError": ".errors",
    "StoreError": ".errors",
    "TaskError": ".errors",
    "VLoRAError": ".errors",
    "export_all": ".export",
    "export_task": ".export",
    "load_adapter": ".io.peft_files",
    "save_adapter": ".io.peft_files",
    "VLoRAModel": ".model",
    "LayerShape": ".records",
    "Task": ".records",
    "SharedSubspace": ".subspace",
    "stream_compress": ".subspace",
    "SubspaceTrainer": ".training",
    "orthogonal_init": ".training",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
