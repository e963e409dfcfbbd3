"""What a user can choose, torch-free: the names and one-line help of every variant, and the defaults.

The CLI's parser and the store's schema check read these tables, so ``vlora --help``, an argument error and
``vlora info`` need no torch. The modules that implement each variant check at import that their tables
name exactly these (tests/test_cli.py checks it too), so the two cannot drift.
"""

BASIS_METHODS = {  # vlora_core.methods.METHODS: name -> summary
    "flat": "each factor flattened, centred PCA across tasks: k loadings per layer and side",
    "rank": "rank columns of all tasks share k directions (Share): k x r loadings per layer and side",
}
STORAGE = {  # vlora_core.precision.PRECISIONS: name -> (flag, summary)
    "float32": ("fp32", "exact"),
    "bfloat16": ("bf16", "half the bytes, relative error <= 2^-9 a number"),
    "float16": ("fp16", "half the bytes, relative error <= 2^-12, range +-65504"),
    "int8": (
        "int8",
        "a quarter of the bytes + a bf16 scale per 32 numbers (8 in loadings rows), error <= max|block|/253 a number",
    ),
}
STORAGE_FLAGS = {flag: name for name, (flag, _) in STORAGE.items()}  # fp32 -> float32, ...
MERGE_METHODS = ("linear", "cat", "ties", "dare")  # vlora_core.merge.METHODS
MERGE_DEFAULTS = {"method": "linear", "density": 0.5, "seed": 0}  # vlora_core.merge.MergeConfig
EXPORT_FORMATS = ("peft", "gguf")  # a PEFT folder, or one llama.cpp .gguf file
DEFAULT_CHUNK = 32  # adapters read at a time by stream_compress
CALIBRATION_DAMPING = 1.0  # λ of vlora_core.calibration: C + λ·mean(diag C)·I (bench/budgets.py --activation-aware)
VLLM_DEFAULT_MAX_LORA_RANK = 16  # vllm/config/lora.py LoRAConfig.max_lora_rank


def agree(table, implemented, what: str) -> None:
    """Raise if a torch-free table and the implementation name different variants (a programming error)."""
    if list(table) != list(implemented):
        raise AssertionError(f"vlora_core.options lists {what} {list(table)}, the implementation {list(implemented)}")
