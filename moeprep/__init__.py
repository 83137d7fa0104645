"""moeprep: offline preshuffling of quantized MoE checkpoints."""
from .errors import BadInputError, MoeprepError, OutputError, TargetError, UnsupportedError, VerifyError
from .hooks import after_import

__all__ = ["load", "load_moe_layer", "BadInputError", "MoeprepError", "OutputError", "TargetError", "UnsupportedError", "VerifyError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The serving API pulls in torch and the compiled ops: import it only when asked for.
    if name in ("load", "load_moe_layer"):
        from . import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'moeprep' has no attribute {name!r}")


def _register_with_transformers() -> None:
    try:
        import moeprep.hf.quantizer  # noqa: F401  (registers itself; may be the module importing transformers now)
    except Exception as e:  # a transformers whose quantizer API moved must still import
        import warnings

        warnings.warn(f"moeprep could not register its quantization method with transformers: {type(e).__name__}: {e}")


# transformers learns `quant_method: "moeprep"` when it sets up its quantizers, not here: importing
# moeprep stays free of torch and transformers.
after_import("transformers.quantizers.auto", _register_with_transformers)
