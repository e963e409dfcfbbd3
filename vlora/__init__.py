"""The public name: ``from vlora import load_adapter, SharedSubspace, VLoRAModel, ...``.

Everything lives in ``vlora_core``; this module only re-exports it.
"""

from vlora_core import *  # noqa: F401,F403
from vlora_core import __all__  # noqa: F401
