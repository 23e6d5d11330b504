"""The only torch-aware code: CPU tensors in and out without copies where dtype allows."""
import numpy as np
import torch


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def to_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"cpu_experts takes CPU tensors, got one on {t.device}")
    t = t.detach()
    want = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}[np.dtype(dtype)]
    if t.dtype != want:
        t = t.to(want)
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)
