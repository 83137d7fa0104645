"""The ``moeprep`` command line.

Each command imports what it runs when it runs: ``--help`` and ``--version`` stay free of torch.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import unicodedata

import click

from .errors import MoeprepError


def _hub_options(fn):
    """--revision, --cache-dir and --token for the commands that open checkpoints by hub repo id;
    the command receives them as ``hub`` (a moeprep.io.hub.HubOptions)."""

    @click.option("--revision", default=None, help="Hub repo ids: a branch, tag or commit (default: main).")
    @click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                  help="Hub repo ids: the cache folder (default: the hub's own).")
    @click.option("--token", default=None, help="Hub repo ids: an access token (default: HF_TOKEN or a saved login).")
    @functools.wraps(fn)
    def wrapper(*args, revision=None, cache_dir=None, token=None, **kwargs):
        from .io.hub import HubOptions

        return fn(*args, hub=HubOptions(revision, cache_dir, token), **kwargs)

    return wrapper


_allow_invalid_scales = click.option(
    "--allow-invalid-scales", is_flag=True,
    help="Carry NaN, infinite, zero or negative scales (and E8M0 0xFF) through instead of refusing them.")


def _clean_errors(fn):
    """Turn every failure into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeprepError as e:
            click.echo(f"moeprep: error: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:  # `moeprep ... | head`: the reader left, not an error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except KeyboardInterrupt:
            click.echo("moeprep: interrupted; no partial output was left behind", err=True)
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


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeprep")
def main() -> None:
    """Preshuffle quantized MoE checkpoints offline, serve them, and prove them right."""


@main.command()
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (every tensor name included).")
@click.option("--tensors", "all_tensors", is_flag=True, help="List every tensor name, not the first few of each kind.")
@_hub_options
@_clean_errors
def inspect(ckpt: str, as_json: bool, all_tensors: bool, hub) -> None:
    """Describe a checkpoint (directory or hub repo id) from its headers alone."""
    from .inspect import describe, render_text
    from .io.checkpoint import Checkpoint
    from .model import build_model_map

    info = describe(build_model_map(Checkpoint(ckpt, hub, headers_only=True)))
    click.echo(json.dumps(info, indent=1) if as_json else render_text(info, all_tensors))


@main.command()
@click.argument("ckpt")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and moeprep dequant wrote it.")
@click.option("--force", is_flag=True, help="Replace OUT even if moeprep did not write it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@_allow_invalid_scales
@_hub_options
@_clean_errors
def dequant(ckpt: str, out: str, dtype: str, overwrite: bool, force: bool, quiet: bool, allow_invalid_scales: bool,
            hub) -> None:
    """Write every quantized linear of CKPT, dequantized, as <module>.weight [out, in] into OUT."""
    from .dequant import DTYPES, dequantize_checkpoint
    from .io.checkpoint import Checkpoint
    from .model import build_model_map
    from .progress import Progress

    model = build_model_map(Checkpoint(ckpt, hub), any_architecture=True)  # the format is all dequant needs
    model.allow_invalid_scales = allow_invalid_scales
    linears = model.linears()
    total = sum(r.out_features * r.in_features for r in linears) * DTYPES[dtype].itemsize
    with Progress("dequant", total, len(linears), quiet) as bar:
        n = dequantize_checkpoint(model, out, DTYPES[dtype], bar.advance, overwrite=overwrite, force=force)
    if not quiet:
        click.echo(f"wrote {n} tensors to {out}")


def _targets_help() -> str:
    from .formats import FORMATS
    from .targets import PREFERENCE, TARGETS

    by_kind: dict[str, list[str]] = {}
    for cls in FORMATS:
        if cls.name != "moeprep":
            by_kind.setdefault(cls.kind, []).append(cls.name)
    lines = ["Targets (--target) and the source formats each can take:"]
    for name, target in TARGETS.items():
        sources = ", ".join(f for k in target.kinds for f in by_kind.get(k, []))
        lines += [f"  {name:<20} {target.summary}", f"  {'':<20} sources: {sources}"]
    lines.append("Default: the first of these that can hold the source exactly:")
    for kind, order in PREFERENCE.items():
        lines.append(f"  {kind} sources ({', '.join(by_kind.get(kind, []))}): {' > '.join(order)}")
    return "\n".join(lines)


class _ConvertCommand(click.Command):
    def format_epilog(self, ctx, formatter) -> None:
        formatter.write_paragraph()
        for line in _targets_help().splitlines():
            formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


@main.command(cls=_ConvertCommand)
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--target", "target", default=None, help="Target layout (shuffle_kind); default: the best for the source format.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and moeprep wrote it.")
@click.option("--force", is_flag=True, help="Replace OUT even if moeprep did not write it.")
@click.option("--dry-run", is_flag=True, help="Print what would be written, write nothing.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="MoE layers converted in parallel.")
@click.option("--fuse-shared-experts", is_flag=True,
              help="Append each layer's shared expert to its stacked experts as one more expert (same format and shape only).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (no progress bar).")
@_allow_invalid_scales
@_hub_options
@_clean_errors
def convert(src: str, out: str, target: str | None, max_shard_size: str, overwrite: bool, force: bool, dry_run: bool,
            workers: int, fuse_shared_experts: bool, quiet: bool, as_json: bool, allow_invalid_scales: bool, hub) -> None:
    """Convert the quantized MoE checkpoint SRC (directory or hub repo id) into OUT."""
    import time
    from pathlib import Path

    from .convert import check_paths, choose_target, describe_plan, execute, parse_size, plan_conversion
    from .io.checkpoint import Checkpoint
    from .model import build_model_map
    from .progress import Progress

    limit = parse_size(max_shard_size)
    model = build_model_map(Checkpoint(src, hub, headers_only=dry_run))
    if fuse_shared_experts:
        model = model.fuse_shared_experts()
    model.allow_invalid_scales = allow_invalid_scales
    chosen = choose_target(model, target)
    out_path = Path(out)
    check_paths(model.ckpt.root, out_path, overwrite, force)
    plan = plan_conversion(model, chosen, limit)
    result = {"source": str(model.ckpt.root), "source_format": model.fmt.name, "out": str(out_path),
              "target": chosen.name, "moe_layers": len(plan.layers), "shards": len(plan.shards),
              "bytes": plan.total_bytes, "fused_shared_experts": model.fused_shared, "dry_run": dry_run}
    if dry_run:
        click.echo(json.dumps(result) if as_json else describe_plan(plan) + "\ndry run: nothing was written")
        return
    quiet = quiet or as_json
    start = time.perf_counter()
    with Progress("convert", plan.total_bytes, sum(len(shard.tensors) for shard in plan.shards), quiet) as bar:
        execute(plan, out_path, workers, bar.advance)
    secs = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({**result, "seconds": round(secs, 3)}))
    elif not quiet:
        size, rate = _human_bytes(plan.total_bytes), _human_bytes(plan.total_bytes / max(secs, 1e-9))
        click.echo(f"converted {len(plan.layers)} MoE layers to {chosen.name}: {size} in {secs:.2f} s ({rate}/s) -> {out_path}")


@main.command()
@click.argument("src")
@click.argument("out")
@click.option("--quiet", "-q", is_flag=True, help="Print only failures.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (every failure listed).")
@_allow_invalid_scales
@_hub_options
@_clean_errors
def verify(src: str, out: str, quiet: bool, as_json: bool, allow_invalid_scales: bool, hub) -> None:
    """Prove that OUT is an exact conversion of SRC; exit 0 only if every check holds."""
    from .progress import Progress
    from .verify import MAX_REPORTED, check_pair, open_pair

    source, converted = open_pair(src, out, hub)
    source.allow_invalid_scales = converted.allow_invalid_scales = allow_invalid_scales
    ckpt = converted.ckpt
    total = sum(ckpt.info(name).nbytes for name in ckpt.names())
    with Progress("verify", total, len(ckpt.names()), quiet or as_json) as bar:
        report = check_pair(source, converted, bar.advance)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "checked": report.checked, "files": report.files,
                               "failures": report.failures}))
        sys.exit(0 if report.ok else 1)
    if report.ok:
        if not quiet:
            click.echo(f"verified: {report.checked} tensors exact, {report.files} copied files identical, "
                       "index and metadata consistent")
        return
    for line in report.failures[:MAX_REPORTED]:
        click.echo(f"moeprep: verify: {line}", err=True)
    more = len(report.failures) - MAX_REPORTED
    click.echo(f"moeprep: verify FAILED: {len(report.failures)} problem(s){f' ({more} more not shown)' if more > 0 else ''}", err=True)
    sys.exit(1)


@main.command()
@click.argument("ckpt")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--device", default="cpu", show_default=True)
@_hub_options
@_clean_errors
def generate(ckpt: str, prompt: str, max_new_tokens: int, device: str, hub) -> None:
    """Greedy text generation from a converted checkpoint through transformers."""
    from .hf import generate as run_generate

    click.echo(printable(run_generate(ckpt, prompt, max_new_tokens, device=device, hub=hub)))


def printable(text: str) -> str:
    """Text safe to print on a terminal: control characters (bar newline and tab), which a
    model may generate, become U+FFFD."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else "\ufffd" for ch in text)
