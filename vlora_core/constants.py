"""File names and format markers, defined once."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_LEGACY = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"

STORE_MANIFEST = "manifest.json"
STORE_FORMAT = "vlora-subspace"
STORE_FORMAT_VERSION = 1

PEFT_PREFIX = "base_model.model."
SIDES = ("A", "B")
