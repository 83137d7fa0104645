"""moeprep: offline preshuffling of quantized MoE checkpoints."""
from .errors import BadInputError, MoeprepError, OutputError, TargetError, UnsupportedError, VerifyError

__all__ = ["load", "load_moe_layer", "BadInputError", "MoeprepError", "OutputError", "TargetError", "UnsupportedError", "VerifyError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The serving API pulls in torch and the compiled ops: import it only when asked for.
    if name in ("load", "load_moe_layer"):
        from . import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'moeprep' has no attribute {name!r}")
