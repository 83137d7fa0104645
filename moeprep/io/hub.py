"""Checkpoints named by Hugging Face hub repo id: which names are ids at all, fetching a repo
whole, or only what describing it needs (its small JSON files and each shard's header, read with
HTTP range requests as ``huggingface_hub``'s ``get_safetensors_metadata`` reads them), and what a
failure means in words.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import BadInputError
from .safetensors_header import Header, header_length, parse_header

INDEX_NAME = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Hub repos often carry other copies of the weights (PyTorch bins, gpt-oss's original/ and metal/).
_HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "original/*", "metal/*"]
# What describing a checkpoint reads besides the shard headers.
_DESCRIPTION = ("config.json", "quantize_config.json", INDEX_NAME)
# The first request for a header asks for this much: nearly every header fits, so one request does.
_FIRST_RANGE = 100_000


@dataclass(frozen=True)
class HubOptions:
    """Where a hub repo id is fetched from: a branch, tag or commit, a cache folder other than the
    hub's default, a token (else the hub library's own: HF_TOKEN or a saved login)."""

    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    token: Optional[str] = None


def check_repo_id(text: str) -> None:
    """Refuse, as a missing directory, a name that looks like a path or is no hub id: such a name
    is never looked up on the hub."""
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise BadInputError("no such directory", path=text)


def download(repo_id: str, hub: HubOptions) -> Path:
    """The repo's snapshot folder, every file but other copies of the weights fetched (or found in
    the cache when offline)."""
    from huggingface_hub import snapshot_download

    with _explained(repo_id):
        return Path(snapshot_download(repo_id, revision=hub.revision, cache_dir=hub.cache_dir, token=hub.token,
                                      ignore_patterns=_HUB_IGNORE))


@dataclass(frozen=True)
class RemoteShards:
    """The files of a hub repo at one commit, whose safetensors headers are read over HTTP."""

    repo_id: str
    commit: str
    files: frozenset[str]
    token: Optional[str]

    def header(self, fname: str) -> Header:
        """One shard's header: its first bytes, then the rest of the header if it is longer."""
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo_id, fname, revision=self.commit)
        label = f"{self.repo_id}/{fname}"
        with _explained(self.repo_id):
            first, size = self._range(url, 0, _FIRST_RANGE - 1)
            n = header_length(label, first[:8], size)
            raw = first[8:8 + n]
            if len(raw) < n:
                raw += self._range(url, len(first), 8 + n - 1)[0]
        return parse_header(label, raw, size)

    def _range(self, url: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes ``start..end`` of a file and the file's whole size (from Content-Range)."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = {**build_hf_headers(token=self.token), "range": f"bytes={start}-{end}"}
        response = get_session().get(url, headers=headers)
        hf_raise_for_status(response)
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if response.status_code == 206 and total.isdigit():
            return response.content, int(total)
        return response.content[start:end + 1], len(response.content)  # a server that ignores ranges


def describe_only(repo_id: str, hub: HubOptions) -> tuple[Path, Optional[RemoteShards]]:
    """A folder with the repo's config, quantize config and index, and its shards to read headers
    from, fetching no weights. Offline or unreachable, the cached snapshot serves (its shards are
    local then, and no ``RemoteShards`` is returned)."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi(token=hub.token).model_info(repo_id, revision=hub.revision)
    except Exception as e:  # noqa: BLE001 - the hub's error classes are many; only these fall back
        if _unreachable(e):
            return download(repo_id, hub), None
        with _explained(repo_id):
            raise
    files = frozenset(s.rfilename for s in info.siblings or ())
    root: Optional[Path] = None
    with _explained(repo_id):
        for name in _DESCRIPTION:
            if name in files:
                root = Path(hf_hub_download(repo_id, name, revision=info.sha, cache_dir=hub.cache_dir,
                                            token=hub.token)).parent
    if root is None:
        raise BadInputError("not a checkpoint: the hub repo has no config.json", path=repo_id)
    return root, RemoteShards(repo_id, info.sha, files, hub.token)


def _unreachable(exc: Exception) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"OfflineModeIsEnabled", "ConnectionError", "ConnectError", "TimeoutException", "Timeout",
                         "TimeoutError", "ConnectTimeout"})


@contextlib.contextmanager
def _explained(repo_id: str) -> Iterator[None]:
    """Re-raise a hub failure as a one-line error that says what happened."""
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except BadInputError:
        raise
    except HFValidationError as e:
        raise BadInputError(f"not a directory, nor a valid hub repo id ({e})", path=repo_id) from None
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes: offline, missing, gated, network
        raise BadInputError(f"no such directory, and {explain(e)}", path=repo_id) from None


def explain(exc: Exception) -> str:
    """What a failed hub request means, in words (the hub's exceptions, by class name, most
    specific first: they subclass one another)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "LocalEntryNotFoundError" in names or offline:
        where = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        return f"the hub repo is not in the local hub cache ({where}: only the cache was searched)"
    if "GatedRepoError" in names:
        return "the hub repo is gated: accept its terms on the hub, then give a token (HF_TOKEN)"
    if "RevisionNotFoundError" in names:
        return "the hub repo has no such revision"
    if "RepositoryNotFoundError" in names:
        return "there is no such hub repo (or it is private: give a token, HF_TOKEN)"
    if "EntryNotFoundError" in names:
        return "a file of the hub repo is missing"
    if _unreachable(exc):
        return "the hub could not be reached (no network?)"
    return f"the hub repo could not be fetched ({type(exc).__name__})"
