"""A Hugging Face checkpoint on disk or in the hub cache: config, shards, headers, lazy tensors.

Headers are parsed and cross-checked (shards, index, duplicates) when the checkpoint is opened;
no tensor data is read until ``get_tensor`` asks for one tensor. Tensors are zero-copy views of
each shard's private memory map (the lazy reading safetensors' ``safe_open`` does, without its
~100 us per-tensor cost, which dominated conversion when every expert has a dozen tensors);
``safe_open`` itself reads the rare tensor whose offset does not suit its dtype's alignment.
``release()`` drops the maps so a streaming caller keeps its resident memory bounded by what it
is working on.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from safetensors import SafetensorError, safe_open

from ..errors import BadInputError
from . import strict_json
from .hub import INDEX_NAME, HubOptions, RemoteShards, check_repo_id, describe_only, download
from .safetensors_header import Header, TensorInfo, read_header

if TYPE_CHECKING:  # torch is imported where tensor data is read: header-only work never loads it
    import torch

SINGLE_NAME = "model.safetensors"


def resolve(source: str | os.PathLike, hub: HubOptions = HubOptions(),
            headers_only: bool = False) -> tuple[Path, Optional[RemoteShards]]:
    """A local checkpoint directory, or a hub repo id: fetched whole, or with ``headers_only``
    just what describing it reads (its shards then read remotely, unless cached)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise BadInputError("not a checkpoint directory (give the directory that holds config.json)", path=str(path))
        return path, None
    text = os.fspath(source)
    check_repo_id(text)
    if headers_only:
        return describe_only(text, hub)
    return download(text, hub), None


def _guard(storage: torch.UntypedStorage, path: Path) -> None:
    """A shard cut short while mapped faults (SIGBUS) on the next read past its new end, which
    ``_check_still_whole`` cannot see coming: the compiled guard (csrc/mapped_guard.cpp) turns that
    into one line naming the file and exit code 2. Without the compiled ops it reads unguarded."""
    try:
        from .. import _C  # noqa: F401  (registers the guard op)
    except ImportError:
        return
    import torch

    message = f"moeprep: error: {path}: the file was cut short while being read (a page past its new end)"
    torch.ops.moeprep.guard_mapping(storage.data_ptr(), storage.nbytes(), message)


def _unguard(storage: torch.UntypedStorage) -> None:
    import torch

    if hasattr(torch.ops.moeprep, "unguard_mapping"):
        torch.ops.moeprep.unguard_mapping(storage.data_ptr())


def _homes(root: Path) -> list[Path]:
    """Where a checkpoint's files may live: its folder, and the hub cache repo of a snapshot."""
    real = root.resolve()
    homes = [real]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        homes.append(root.parent.parent.resolve())
    return homes


def check_outside(src: Path, out: Path) -> None:
    """Outputs never go inside a source checkpoint: moeprep does not modify its inputs."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise BadInputError(f"the output is inside the source checkpoint {src}; moeprep never writes into its input", path=str(out))


def _load_json(path: Path) -> dict:
    try:
        obj = strict_json.loads(path.read_bytes())
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path=str(path)) from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise BadInputError(f"invalid JSON: {e}", path=str(path)) from None
    if not isinstance(obj, dict):
        raise BadInputError("invalid JSON: expected an object", path=str(path))
    return obj


class Checkpoint:
    """Read-only view of one checkpoint directory."""

    def __init__(self, source: str | os.PathLike, hub: HubOptions = HubOptions(), headers_only: bool = False):
        self.root, self._remote = resolve(source, hub, headers_only)
        self._homes = _homes(self.root)
        config_path = self.root / "config.json"
        if not config_path.exists():
            raise BadInputError("not a checkpoint: no config.json", path=str(self.root))
        self.config = _load_json(self.inside(config_path))
        qc_path = self.root / "quantize_config.json"
        self.quantize_config = _load_json(self.inside(qc_path)) if qc_path.exists() else None
        self.shard_files = self._find_shards()
        self.headers: dict[str, Header] = {f: self._read_header(f) for f in self.shard_files}
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}
        for fname, header in self.headers.items():
            for name, info in header.tensors.items():
                if name in self.tensors:
                    raise BadInputError(
                        f"tensor stored twice, also in {self.tensors[name][0]}", path=str(self.root / fname), tensor=name
                    )
                self.tensors[name] = (fname, info)
        if self.index is not None:
            self._check_index()
        self._handles: dict[str, object] = {}
        self._maps: dict[str, torch.UntypedStorage] = {}
        self._supplied: dict[str, torch.Tensor] = {}

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        if qc is None and self.quantize_config is not None:
            return self.quantize_config
        return qc

    def _find_shards(self) -> list[str]:
        index_path = self.root / INDEX_NAME
        self.index = None
        if index_path.exists():
            self.index = _load_json(self.inside(index_path))
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise BadInputError("invalid index: weight_map must map tensor names to file names", path=str(index_path))
            files = sorted(set(weight_map.values()))
            for f in files:
                if Path(f).name != f:
                    raise BadInputError(f"invalid index: shard name {f!r} is not a plain file name", path=str(index_path))
                if not self._has(f):  # read_header refuses what is not a regular file
                    first = next(name for name, shard in weight_map.items() if shard == f)
                    raise BadInputError(f"shard listed in the index is missing: {f}", path=str(index_path), tensor=first)
            return files
        if self._has(SINGLE_NAME):
            return [SINGLE_NAME]
        found = sorted({p.name for p in self.root.glob("*.safetensors")}
                       | {f for f in (self._remote.files if self._remote else ()) if "/" not in f and f.endswith(".safetensors")})
        if len(found) == 1:
            return found
        if found:
            raise BadInputError(f"{len(found)} safetensors files but no {INDEX_NAME}", path=str(self.root))
        raise BadInputError("not a checkpoint: no *.safetensors weights", path=str(self.root))

    def _has(self, fname: str) -> bool:
        return (self.root / fname).exists() or (self._remote is not None and fname in self._remote.files)

    def _read_header(self, fname: str) -> Header:
        """A shard's header, from the file, or over HTTP for a hub repo opened for its headers."""
        local = self.root / fname
        if self._remote is not None and not local.exists():
            return self._remote.header(fname)
        return read_header(self.inside(local))

    def _check_index(self) -> None:
        index_path = str(self.root / INDEX_NAME)
        weight_map = self.index["weight_map"]
        for name, fname in weight_map.items():
            if name not in self.tensors:
                raise BadInputError(f"tensor listed in the index is not in its shard {fname}", path=index_path, tensor=name)
            actual = self.tensors[name][0]
            if actual != fname:
                raise BadInputError(f"index says shard {fname} but the tensor is in {actual}", path=index_path, tensor=name)
        for name, (fname, _) in self.tensors.items():
            if name not in weight_map:
                raise BadInputError("tensor is in a shard but not in the index", path=str(self.root / fname), tensor=name)

    # --- metadata -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name][1]
        except KeyError:
            raise BadInputError("missing tensor", path=str(self.root), tensor=name) from None

    def file_of(self, name: str) -> Path:
        return self.root / self.tensors[name][0]

    def metadata(self, fname: str) -> dict[str, str]:
        return self.headers[fname].metadata

    def tensor_metadata(self, name: str) -> dict | None:
        """The JSON object a shard's ``__metadata__`` keeps under this tensor's name, if any."""
        fname = self.tensors[name][0]
        text = self.headers[fname].metadata.get(name)
        if text is None:
            return None
        try:
            value = strict_json.loads(text)
        except ValueError as e:
            raise BadInputError(f"metadata of the tensor is not valid JSON: {e}", path=str(self.root / fname), tensor=name) from None
        if not isinstance(value, dict):
            raise BadInputError("metadata of the tensor is not a JSON object", path=str(self.root / fname), tensor=name)
        return value

    # --- data ---------------------------------------------------------------------------------

    def _storage(self, fname: str) -> torch.UntypedStorage:
        """The shard as one private (copy-on-write) memory map: tensors are views into it, so
        nothing is read until touched, and nothing written through a view reaches the file."""
        import torch

        storage = self._maps.get(fname)
        if storage is None:
            path = self.root / fname
            try:
                storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=self.headers[fname].file_size)
            except (OSError, RuntimeError) as e:
                raise BadInputError(f"cannot map: {e}", path=str(path)) from None
            self._maps[fname] = storage
            _guard(storage, path)
        return storage

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.root / fname), framework="pt")
            except (SafetensorError, OSError) as e:
                raise BadInputError(f"cannot open: {e}", path=str(self.root / fname)) from None
            self._handles[fname] = h
        return h

    def supply(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors an engine's own loader has already read from this checkpoint's files: they answer
        ``get_tensor`` from now on, so nothing is read twice. Each must be what its header says."""
        import torch

        for name, t in tensors.items():
            info = self.info(name)
            if tuple(t.shape) != tuple(info.shape) or t.dtype != getattr(torch, info.torch_dtype_name):
                raise BadInputError(f"loaded as {t.dtype} {list(t.shape)}, stored as {info.dtype} {list(info.shape)}",
                                    path=str(self.file_of(name)), tensor=name)
        self._supplied.update(tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read lazily: a zero-copy view of the shard's memory map (safetensors'
        ``safe_open`` for a tensor whose offset does not suit its dtype's alignment)."""
        import torch

        supplied = self._supplied.get(name)
        if supplied is not None:
            return supplied
        fname, info = self.tensors.get(name, (None, None))
        if fname is None:
            raise BadInputError("missing tensor", path=str(self.root), tensor=name)
        dtype = getattr(torch, info.torch_dtype_name)
        self._check_still_whole(fname, name)
        try:
            if info.begin % dtype.itemsize == 0:
                t = torch.empty(0, dtype=dtype)
                return t.set_(self._storage(fname), info.begin // dtype.itemsize, info.shape)
            return self._handle(fname).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise BadInputError(f"cannot read tensor data: {e}", path=str(self.root / fname), tensor=name) from None

    def _check_still_whole(self, fname: str, name: str) -> None:
        """A shard cut short after its header was read would kill the process on the first read
        of a missing page (SIGBUS) instead of failing cleanly: its size is checked before each
        tensor is handed out (a cut that lands between this check and the read still does)."""
        path = self.root / fname
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise BadInputError(f"cannot read: {e.strerror or e}", path=str(path), tensor=name) from None
        if size < self.headers[fname].file_size:
            raise BadInputError(f"the file was cut short while being read ({size} of {self.headers[fname].file_size} bytes)",
                                path=str(path), tensor=name)

    def get_expert(self, name: str, expert: int) -> torch.Tensor:
        """``tensor[expert]`` of a stacked-experts tensor, reading only that slice."""
        return self.get_tensor(name)[expert]

    def release(self) -> None:
        """Drop the memory maps of all shards (tensors already returned keep theirs alive)."""
        for storage in self._maps.values():
            _unguard(storage)
        self._handles.clear()
        self._maps.clear()
        self._supplied.clear()

    def inside(self, path: Path) -> Path:
        """``path`` if it is a regular file of this checkpoint: a symlink may point only within the
        checkpoint's folder, or within the hub cache repo it lives in (whose snapshots link to
        its blobs). Nothing else is read, so nothing else can reach an output."""
        real = path.resolve()
        if not any(real == home or home in real.parents for home in self._homes):
            raise BadInputError(f"a link to {real}, outside the checkpoint; moeprep reads only the checkpoint's own files",
                                path=str(path))
        try:
            regular = stat.S_ISREG(real.stat().st_mode)
        except OSError as e:
            raise BadInputError(f"cannot read: {e.strerror or e}", path=str(path)) from None
        if not regular:
            raise BadInputError("not a regular file", path=str(path))
        return path

    def iter_files(self) -> Iterator[Path]:
        """Every non-weight file of the checkpoint (config, tokenizer, ...), for copying; a link
        that leaves the checkpoint is refused, and what is not a file is not one of them."""
        weights = set(self.shard_files) | {INDEX_NAME}
        for p in sorted(self.root.iterdir()):
            if p.name in weights or p.name.endswith(".safetensors") or p.is_dir():
                continue
            if p.is_symlink() or p.is_file():
                yield self.inside(p)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
