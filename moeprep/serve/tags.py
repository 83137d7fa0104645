"""Tensors that remember they are preshuffled.

aiter's ``fused_moe`` and ATOM check ``getattr(w, "is_shuffled", False)`` (and a shuffle kind).
Plain Python attributes on a tensor vanish on ``.to(device)`` and inside ``nn.Parameter``, a
known way to feed unshuffled-looking weights to a shuffled kernel. A tensor subclass carries the
tags through every layout-preserving operation instead, and drops them (returning a plain
tensor) for anything that computes new values.
"""
from __future__ import annotations

import torch

_PRESERVING = {
    torch.Tensor.to,
    torch.Tensor.cuda,
    torch.Tensor.cpu,
    torch.Tensor.detach,
    torch.Tensor.clone,
    torch.Tensor.contiguous,
    torch.Tensor.requires_grad_,
    torch.Tensor.pin_memory,
    torch.Tensor.share_memory_,
}


class ShuffledTensor(torch.Tensor):
    """A tensor in a preshuffled layout, tagged ``is_shuffled = True`` and ``shuffle_kind``."""

    is_shuffled: bool = True
    shuffle_kind: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        source = args[0] if args and isinstance(args[0], ShuffledTensor) else None
        if func in _PRESERVING and source is not None and isinstance(out, ShuffledTensor):
            out.shuffle_kind = source.shuffle_kind
            return out
        return _plain(out)

    def __deepcopy__(self, memo):
        out = tag(self.as_subclass(torch.Tensor).clone(), self.shuffle_kind)
        out.requires_grad_(self.requires_grad)
        if getattr(self, "_is_param", False):  # nn.Parameter-ness of a subclass is this flag
            out._is_param = True
        memo[id(self)] = out
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"ShuffledTensor(shuffle_kind={getattr(self, 'shuffle_kind', None)!r}, shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"


def _plain(value):
    if isinstance(value, ShuffledTensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def tag(t: torch.Tensor, shuffle_kind: str) -> ShuffledTensor:
    out = t.as_subclass(ShuffledTensor)
    out.shuffle_kind = shuffle_kind
    return out
