"""The ``moeprep`` command line."""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from .errors import MoeprepError


def _clean_errors(fn):
    """Turn every failure into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeprepError as e:
            click.echo(f"moeprep: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("moeprep: interrupted; nothing was written", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("moeprep: error: out of memory", err=True)
            sys.exit(1)
        except Exception as e:  # an internal bug: still one line, a traceback only on request
            if os.environ.get("MOEPREP_DEBUG"):
                raise
            msg = " ".join(str(e).split())
            click.echo(f"moeprep: internal error: {type(e).__name__}: {msg} (MOEPREP_DEBUG=1 shows a traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeprep")
def main() -> None:
    """Preshuffle quantized MoE checkpoints offline, serve them, and prove them right."""


@main.command()
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_clean_errors
def inspect(ckpt: str, as_json: bool) -> None:
    """Describe a checkpoint (directory or hub repo id) from its headers alone."""
    from .inspect import describe, render_text
    from .io.checkpoint import Checkpoint
    from .model import build_model_map

    info = describe(build_model_map(Checkpoint(ckpt)))
    click.echo(json.dumps(info, indent=1) if as_json else render_text(info))


@main.command()
@click.argument("ckpt")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@_clean_errors
def dequant(ckpt: str, out: str, dtype: str) -> None:
    """Write every quantized linear of CKPT, dequantized, as <module>.weight [out, in] into OUT."""
    from .dequant import DTYPES, dequantize_checkpoint
    from .io.checkpoint import Checkpoint
    from .model import build_model_map

    n = dequantize_checkpoint(build_model_map(Checkpoint(ckpt)), out, DTYPES[dtype])
    click.echo(f"wrote {n} tensors to {out}")
