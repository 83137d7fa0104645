"""``moeprep dequant``: every quantized linear of a checkpoint, dequantized, in HF orientation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from .canonical import dequantize
from .errors import BadInputError
from .io.checkpoint import check_outside
from .io.names import layer_of
from .io.outputs import check_replaceable, published, sigterm_as_interrupt
from .io.safetensors_header import read_header
from .io.safetensors_writer import SafetensorsWriter, TensorSpec, write_error
from .model import ModelMap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARK = "moeprep"  # the header metadata key that says moeprep dequant wrote a file


def is_dequant_output(path: Path) -> bool:
    """Whether a file is a safetensors file that ``moeprep dequant`` wrote."""
    try:
        return MARK in read_header(path).metadata
    except BadInputError:
        return False


def _cast(w: torch.Tensor, dtype: torch.dtype, model: ModelMap, ref) -> torch.Tensor:
    """The exact fp32 weight in ``dtype``, refused where a finite value would not fit it: too large
    (it would be infinite) or too small (a nonzero weight would be 0)."""
    if dtype == torch.float32:
        return w
    out = w.to(dtype)
    over = int((torch.isfinite(w) & torch.isinf(out)).sum())
    under = int(((w != 0) & (out == 0)).sum())
    if over or under:
        name = next(iter(ref.parts.values()))
        what = f"{over} weight(s) of {ref.module} exceed" if over else \
            f"{under} nonzero weight(s) of {ref.module} are below"
        raise BadInputError(f"{what} {str(dtype).removeprefix('torch.')}'s range; dequantize to float32",
                            path=str(model.ckpt.file_of(name)), tensor=ref.module)
    return out


def dequantize_checkpoint(
    model: ModelMap,
    out: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    progress: Optional[Callable[[int, int], None]] = None,
    *,
    overwrite: bool = False,
    force: bool = False,
) -> int:
    """Write ``<module>.weight`` for every quantized linear into one safetensors file.

    Modules are read one at a time, so memory holds one linear plus the file being written.
    ``progress(bytes, tensors)`` as each is written. Returns the number of tensors written.
    """
    out = Path(out)
    check_outside(model.ckpt.root, out)
    if out.is_dir() and not out.is_symlink():
        raise BadInputError("is a directory; give a .safetensors file path", path=str(out))
    check_replaceable(out, overwrite, force, is_dequant_output, "file")
    linears = model.linears()
    specs = [TensorSpec(f"{r.module}.weight", dtype, (r.out_features, r.in_features)) for r in linears]
    meta = {"format": "pt", MARK: f"dequant of {model.fmt.name} checkpoint {model.ckpt.root.name}"}
    try:
        with sigterm_as_interrupt(), published(out, "file") as tmp:
            writer = SafetensorsWriter(tmp, specs, meta)
            try:
                layer = None
                for ref, spec in zip(linears, specs):
                    if layer_of(ref.module) != layer:
                        model.ckpt.release()  # keep resident memory to the layer at hand
                        layer = layer_of(ref.module)
                    writer.write(spec.name, _cast(dequantize(model.read(ref)), dtype, model, ref))
                    if progress:
                        progress(spec.nbytes, 1)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    except OSError as e:
        raise write_error(out, e) from None
    return len(specs)
