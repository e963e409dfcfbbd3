"""vlora_core: many PEFT LoRA adapters as one shared basis plus small per-task loadings."""

from .adapter import LoRAAdapter, LoRALayer
from .config import CompressConfig
from .errors import AdapterError, CompatibilityError, StoreError, TaskError, VLoRAError
from .export import export_all, export_task
from .io.peft_files import load_adapter, save_adapter
from .model import VLoRAModel
from .records import LayerShape, Task
from .subspace import SharedSubspace, stream_compress
from .training import SubspaceTrainer, orthogonal_init

__all__ = [
    "AdapterError",
    "CompatibilityError",
    "CompressConfig",
    "LayerShape",
    "LoRAAdapter",
    "LoRALayer",
    "SharedSubspace",
    "StoreError",
    "SubspaceTrainer",
    "Task",
    "TaskError",
    "VLoRAError",
    "VLoRAModel",
    "export_all",
    "export_task",
    "load_adapter",
    "orthogonal_init",
    "save_adapter",
    "stream_compress",
]
