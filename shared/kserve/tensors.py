"""Tensor helpers free of generated code, so that cores (which never import protobuf modules) can use them."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["bf16_to_torch"]


def bf16_to_torch(array: np.ndarray) -> torch.Tensor:
    """Turns a ``uint16`` array of bfloat16 bit patterns (as decoded) into a ``torch.bfloat16`` tensor."""
    bits = np.ascontiguousarray(array)
    if not bits.flags.writeable:
        # Decoded arrays view the (immutable) message bytes; torch wants memory it may write.
        bits = bits.copy()
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
