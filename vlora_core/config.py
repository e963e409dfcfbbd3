"""Compression settings: one frozen dataclass that validates itself.

The CLI flags, the workbench controls and the Python API all take their defaults from here.
"""

from dataclasses import dataclass

from .errors import VLoRAError

DEFAULT_NUM_COMPONENTS = 4
DEFAULT_VARIANCE_THRESHOLD = 0.9
DEFAULT_METHOD = "flat"


@dataclass(frozen=True)
class CompressConfig:
    num_components: int = DEFAULT_NUM_COMPONENTS  # k: basis directions kept per layer and side
    method: str = DEFAULT_METHOD  # which basis: a key of vlora_core.methods.METHODS
    adaptive_k: bool = False  # choose k per layer and side from the variance threshold instead
    variance_threshold: float = DEFAULT_VARIANCE_THRESHOLD  # share of variance adaptive k must explain

    def __post_init__(self):
        if isinstance(self.num_components, bool) or not isinstance(self.num_components, int):
            raise VLoRAError(f"num_components must be a whole number, got {self.num_components!r}.")
        if self.num_components <= 0:
            raise VLoRAError(
                f"num_components (k) must be at least 1, got {self.num_components}; "
                "try k=4, or use adaptive k with a variance threshold."
            )
        from .methods import get_method  # here, not at the top: the CLI reads the defaults above without torch

        get_method(self.method)  # unknown names: an error listing the known ones
        if not 0.0 < self.variance_threshold <= 1.0:
            raise VLoRAError(f"variance threshold must be in (0, 1], got {self.variance_threshold}; for example 0.9.")
