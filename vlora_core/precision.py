"""Storage precision: the dtype a store's basis, mean and loadings are written in, and what it costs.

    float32   4 bytes a number, exact
    bfloat16  2 bytes, relative error at most 2⁻⁹ per number
    float16   2 bytes, relative error at most 2⁻¹² per number above 6.1e-5 (below: 3e-8 absolute); a row
              whose largest |x| is above 65504 or below 6.1e-5 does not fit (refused: bf16 has float32's range)
    int8      1 byte a number + a bfloat16 scale per block of B numbers along a row (a basis direction, the mean,
              a task's loading row): B = 32 in rows of at least 128 numbers, else 8 (``int8_block``; a row's last
              block may be shorter, no block spans two rows). Symmetric: s = max|block| / 127 rounded to bfloat16,
              q = round(x / s) within ±127; |x − q·s| ≤ s/2, i.e. at most max|block| / 253 per number, so a large
              number coarsens only its own block. Stores written with one scale per row still read.

In memory a store holds float32 numbers its precision represents exactly (``round_trip``): its ΔW errors,
measured after the round trip, are those of what is on disk, and writing it again gives the same bytes
(an int8 block's largest code is ±127 and its scale a bfloat16 number, so 127·s and (127·s)/127 are exact in
float32; the blocks depend on the row's length alone, so the same codes and scales come back). The singular
values and the energy are always float32 / float64: a few numbers per layer side. Variants are table entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .constants import int8_block, int8_scale_shapes
from .errors import VLoRAError
from .options import STORAGE, agree

SCALE = ".scale"  # the key suffix of an int8 tensor's scales in a store file (their shapes: int8_scale_shapes)


@dataclass(frozen=True)
class Precision:
    name: str  # as the manifest records it (a torch dtype name)
    flag: str  # as the CLI spells it
    bytes_per_number: float  # without int8's scales
    summary: str
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # float32 (..., n) -> {"": values, SCALE: ...}
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # the same dict -> float32 (..., n)
    stored_dtypes: tuple[torch.dtype, ...]  # the dtypes of "" and (int8) SCALE in a file

    def round_trip(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as this precision stores it, back in float32 (``t`` itself for float32)."""
        return t if self.name == "float32" else self.decode(self.encode(t))

    def num_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one tensor of ``shape`` in a store file (int8: plus its blocks' scales), headers aside."""
        numel = int(torch.Size(shape).numel())
        if self.name != "int8" or not shape:
            return int(numel * self.bytes_per_number)
        return numel + 2 * int(torch.Size(int8_scale_shapes(shape)[0]).numel())


def _cast(dtype: torch.dtype) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    info = torch.finfo(dtype)

    def encode(t: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = t.float().abs().amax(dim=-1) if t.numel() else t.new_zeros(0)
        if bool(((rows > info.max) | ((rows > 0) & (rows < info.tiny))).any()):
            raise VLoRAError(
                f"stored numbers of size {rows[rows > 0].min().item():.3g}..{rows.max().item():.3g} are out of "
                f"{str(dtype).removeprefix('torch.')}'s range; store in bf16 (--dtype bf16), which has float32's range."
            )
        return {"": t.float().to(dtype).contiguous()}

    return encode


def _encode_int8(t: torch.Tensor) -> dict[str, torch.Tensor]:
    x = t.float()
    n = x.shape[-1]
    B = int8_block(n)
    nb = -(-n // B)  # blocks per row, the last one zero-padded here (padding is never written)
    blocks = torch.nn.functional.pad(x, (0, nb * B - n)).reshape(*x.shape[:-1], nb, B)  # (..., nb, B)
    scale = (blocks.abs().amax(dim=-1) / 127).to(torch.bfloat16).float()  # (..., nb) within 2⁻⁹ of max|block| / 127
    q = torch.where(scale[..., None] > 0, blocks / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)
    q = q.round().clamp(-127, 127).reshape(*x.shape[:-1], nb * B)[..., :n]  # (..., n)
    return {"": q.to(torch.int8).contiguous(), SCALE: scale.to(torch.bfloat16).contiguous()}


def _decode_int8(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    q, scale = parts[""].float(), parts[SCALE].float()
    if scale.shape == int8_scale_shapes(q.shape)[1]:  # one scale per row: a store written before the blocks
        return q * scale[..., None]
    n = q.shape[-1]
    return q * scale.repeat_interleave(int8_block(n), dim=-1)[..., :n]  # exact: 7-bit codes times 8-bit scales


PRECISIONS: dict[str, Precision] = {}


def register(precision: Precision) -> Precision:
    PRECISIONS[precision.name] = precision
    return precision


for _dtype, _size in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
    _flag, _summary = STORAGE[str(_dtype).removeprefix("torch.")]
    register(
        Precision(
            str(_dtype).removeprefix("torch."),
            _flag,
            _size,
            _summary,
            _cast(_dtype),
            lambda parts: parts[""].float(),
            (_dtype,),
        )
    )
register(
    Precision(
        "int8",
        STORAGE["int8"][0],
        1,
        STORAGE["int8"][1],
        _encode_int8,
        _decode_int8,
        (torch.int8, torch.bfloat16),
    )
)
FLAGS = {p.flag: p.name for p in PRECISIONS.values()}  # fp32 -> float32, ...
agree(STORAGE, PRECISIONS, "storage precisions")


def get_precision(name: str) -> Precision:
    """The table entry for a dtype name ("bfloat16") or flag ("bf16"); unknown names list the known ones."""
    key = FLAGS.get(name, name)
    if key not in PRECISIONS:
        raise VLoRAError(f"unknown storage dtype {name!r}; choose one of: {', '.join(FLAGS)}.")
    return PRECISIONS[key]


def default_precision(adapter_dtypes: list[str]) -> str:
    """The storage dtype when none is asked for: bfloat16 when every input adapter is bf16 or fp16 (the store
    then adds rounding of the order the inputs already carry, at half the bytes), else float32 (exact)."""
    low = {"bfloat16", "float16"}
    return "bfloat16" if adapter_dtypes and set(adapter_dtypes) <= low else "float32"
