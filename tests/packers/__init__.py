"""Independent packers for quantized MoE checkpoints of every source format moeprep reads.

Written from tests/data/FORMATS.md only (never from moeprep's code), in numpy, and
validated against the real fixtures: the oracle reproduces each fixture's
ref_dequant.safetensors bit for bit, and the packers re-pack each fixture's integer codes into
its exact tensor bytes (tests/test_support_packers.py).

    from packers import build_checkpoint  # tests/ is on sys.path under pytest (rootdir conftest)
    ckpt = build_checkpoint(tmp_path / "gptq", "gptq", arch="mixtral", desc_act=True)
    # ckpt/ref_dequant.safetensors: float32 [out, in] per quantized module; packer_info.json
"""

from . import oracle
from .archs import ARCHS, MIXTRAL_NAMINGS, Naming
from .build import build_checkpoint
from .options import FORMATS, Options
from .reference import detect_format, iter_reference

__all__ = [
    "ARCHS",
    "FORMATS",
    "MIXTRAL_NAMINGS",
    "Naming",
    "Options",
    "build_checkpoint",
    "detect_format",
    "iter_reference",
    "oracle",
]
