"""aiter's own layout functions, as a test oracle, fetched from PyPI at test time (never vendored).

The PyPI wheel ``amd-aiter`` ships ``aiter/ops/shuffle.py`` (pure torch: loaded by file path
without importing the aiter package) and ``aiter/utility/fp4_utils.py`` (imports triton and
sibling modules, so only its ``e8m0_shuffle`` function is taken, with ``ast``). The wheel is
downloaded once into pytest's cache (or, with ``-p no:cacheprovider``, into $MOEPREP_AITER_CACHE,
default <tmp>/moeprep-aiter-wheel); without network access or a package mirror the tests that
need it are skipped with the reason.

    from aiter_oracle import aiter  # noqa: F401  (session fixture)
    def test_x(aiter): aiter.shuffle_weight(x)
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import pytest
import torch

AITER_SPEC = "amd-aiter==0.1.7.post2.dev18"
SHUFFLE_PY = "aiter/ops/shuffle.py"
FP4_UTILS_PY = "aiter/utility/fp4_utils.py"


class AiterUnavailable(Exception):
    pass


def _wheel(cache: Path) -> Path:
    found = sorted(cache.glob("amd_aiter-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "15", AITER_SPEC, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AiterUnavailable(f"`pip download {AITER_SPEC}` failed: {exc}") from None
        wheels = sorted(Path(tmp).glob("amd_aiter-*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise AiterUnavailable(f"`pip download {AITER_SPEC}` failed: {last}")
        # rename within the cache dir: concurrent sessions never see a partial wheel
        return Path(shutil.move(str(wheels[0]), cache / wheels[0].name))


def _function_from_source(source: str, name: str, filename: str) -> types.FunctionType:
    tree = ast.parse(source, filename)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not nodes:
        raise AiterUnavailable(f"{filename} has no function {name}")
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), filename, "exec"), namespace)
    return namespace[name]


def load_aiter(cache: Path) -> types.SimpleNamespace:
    """aiter's shuffle_weight, shuffle_weight_a16w4, shuffle_scale_a16w4 and e8m0_shuffle."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _wheel(cache)
    with zipfile.ZipFile(wheel) as zf:
        shuffle_src = zf.read(SHUFFLE_PY)
        fp4_src = zf.read(FP4_UTILS_PY).decode()
    shuffle_path = cache / "aiter_ops_shuffle.py"
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".py", delete=False) as tmp:
        tmp.write(shuffle_src)
    os.replace(tmp.name, shuffle_path)  # atomic: a concurrent session never reads half a file
    spec = importlib.util.spec_from_file_location("aiter_ops_shuffle_oracle", shuffle_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return types.SimpleNamespace(
        shuffle_weight=module.shuffle_weight,
        shuffle_weight_a16w4=module.shuffle_weight_a16w4,
        shuffle_scale_a16w4=module.shuffle_scale_a16w4,
        e8m0_shuffle=_function_from_source(fp4_src, "e8m0_shuffle", FP4_UTILS_PY),
        source=wheel.name,
    )


@pytest.fixture(scope="session")
def aiter(request) -> types.SimpleNamespace:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        where = Path(cache.mkdir("aiter-wheel"))
    else:
        where = Path(os.environ.get("MOEPREP_AITER_CACHE", Path(tempfile.gettempdir()) / "moeprep-aiter-wheel"))
    try:
        return load_aiter(where)
    except AiterUnavailable as exc:
        pytest.skip(f"aiter oracle unavailable: {exc}")
