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
