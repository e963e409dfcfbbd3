"""File names and format markers, defined once."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_LEGACY = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_PRODUCER = "vlora-export"  # the "producer" in an exported adapter_model.safetensors' metadata

STORE_MANIFEST = "manifest.json"
STORE_LOCK = ".vlora.lock"  # writers hold it (filelock); readers never need it
STORE_FORMAT = "vlora-subspace"
STORE_FORMAT_VERSION = 3  # 2: a generation number and a checksum of the manifest itself; 3: see below
# 3: a basis may list only its leading singular values plus the whole spectrum's energy ("<i>.<side>.energy")
READABLE_STORE_VERSIONS = (2, 3)  # what this vlora reads; it writes STORE_FORMAT_VERSION

PEFT_PREFIX = "base_model.model."
SIDES = ("A", "B")


def int8_block(n: int) -> int:
    """Numbers per bfloat16 scale in an int8 row of ``n`` numbers (``vlora_core.precision``): 32 in rows of at
    least 128 (basis directions, means), else 8 (a task's loading rows: k numbers that fall with the singular
    values, so a block of the large leading ones does not coarsen the small trailing ones). Here, torch-free,
    because ``vlora info`` checks the scales' shapes from the file headers alone."""
    return 32 if n >= 128 else 8


def int8_scale_shapes(shape) -> tuple[tuple[int, ...], ...]:
    """The shapes the scales of an int8 tensor of ``shape`` may have in a store file: one a block of each row (as
    written now), or one a row (stores written before the blocks); none for a tensor without rows."""
    if not shape:
        return ()
    *rows, n = shape
    return (*rows, -(-n // int8_block(n))), tuple(rows)
