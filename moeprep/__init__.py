"""moeprep: offline preshuffling of quantized MoE checkpoints."""
from .errors import BadInputError, MoeprepError, OutputError, TargetError, UnsupportedError, VerifyError

__all__ = ["BadInputError", "MoeprepError", "OutputError", "TargetError", "UnsupportedError", "VerifyError"]
__version__ = "0.1.0"
