"""Guarded buffers: the allocator that tests and the GPU check install (`launch.use_allocator`) to
catch a kernel that writes outside its buffer, or leaves part of an output unwritten.

Each buffer is the interior of a larger one with `guard_rows` poisoned rows (of its first
dimension) before and after it. The poison is a NaN with a payload that no arithmetic produces, so
`problems()` can tell bit for bit whether a guard row was touched and whether every element of an
output was written. On a GPU a stray write past the end of a buffer lands silently in a neighbour;
here it lands in a guard row and is reported.
"""

from __future__ import annotations

import torch

from .launch import traced

__all__ = ["GuardedAllocator", "POISON"]

# (integer view, bit pattern) per dtype: quiet NaNs with a payload arithmetic never produces
POISON = {
    torch.float64: (torch.int64, 0x7FF8A5A5A5A5A5A5),
    torch.float32: (torch.int32, 0x7FC5A5A5),
    torch.bfloat16: (torch.int16, 0x7FC5),
    torch.float16: (torch.int16, 0x7E5A),
}


class GuardedAllocator:
    """An allocator for `launch.set_allocator`: every buffer poisoned and fenced by guard rows.
    Buffers that kernels add into (`zeroed`) start at zero inside and only their guards are checked."""

    def __init__(self, guard_rows: int = 16):
        self.guard_rows = guard_rows
        self.buffers: list[tuple[str, torch.Tensor, torch.Tensor, bool]] = []

    def __call__(self, what: str, like: torch.Tensor, shape: tuple, dtype: torch.dtype, zeroed: bool):
        if traced(like) or dtype not in POISON:  # torch.compile's fake tensors hold no data
            return like.new_zeros(shape, dtype=dtype) if zeroed else like.new_empty(shape, dtype=dtype)
        g = self.guard_rows
        int_dtype, bits = POISON[dtype]
        rows = shape[0] if shape else 1
        full = torch.full((rows + 2 * g, *shape[1:]), bits, dtype=int_dtype, device=like.device).view(dtype)
        interior = full[g : g + rows].view(shape)
        if zeroed:
            interior.zero_()
        self.buffers.append((what, full, interior, zeroed))
        return interior

    def problems(self) -> list[str]:
        """What went wrong so far: guard rows written, outputs left (partly) unwritten."""
        found = []
        for what, full, interior, zeroed in self.buffers:
            int_dtype, bits = POISON[full.dtype]
            poisoned = full.view(int_dtype) == bits
            g, rows = self.guard_rows, full.shape[0] - 2 * self.guard_rows
            shape = tuple(interior.shape)
            for side, guard in (("before", poisoned[:g]), ("after", poisoned[g + rows :])):
                if not guard.all():
                    touched = (~guard).reshape(g, -1).any(1).nonzero().flatten().tolist()
                    found.append(f"{what} {shape}: guard rows {side} it written (rows {touched} of {g})")
            inside = poisoned[g : g + rows]
            if not zeroed and inside.any():
                unwritten = inside.reshape(rows, -1).any(1).nonzero().flatten()
                found.append(
                    f"{what} {shape}: {int(inside.sum())} elements never written "
                    f"(in rows {unwritten[:8].tolist()}{' ...' if len(unwritten) > 8 else ''})"
                )
        return found

    def check(self) -> None:
        """Raise AssertionError naming every problem."""
        found = self.problems()
        assert not found, "kernel buffers:\n  " + "\n  ".join(found)
