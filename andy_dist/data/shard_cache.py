"""Where a shard set's files are read from, and what is checked before a file is first read, once per node.

`ShardFiles` serves one shard set, local or remote (`andy_dist.data.remote`):

* Remote: each file is copied into this node's cache (`cache_dir`, default `$ANDY_CACHE_DIR` or
  `~/.cache/andy_dist`; put it on a node-local disk), as `CACHE/shards/NAME-HASH/FILE`. A copy is
  downloaded to a temporary name, checked against the manifest (size and sha256) and only then
  renamed into place, so a transfer cut halfway never becomes a cached shard. One process per node
  downloads a given file; the others wait on its file lock and then use the copy.
* Local: the files are read where they are (a local disk or a shared filesystem). With
  `data_verify=once` each shard's sha256 is computed once per node, before its first read.

Verification is remembered per node: a record of (size, mtime, inode) of the verified file. The next
process or run that finds the record matching the file skips the hash; a cached copy that changed
since (a damaged disk, a stray write) no longer matches, is hashed again, and when it is wrong it is
deleted and fetched again (remote) or named in an error (local). `data_verify=sha256` and `full` hash
at every start. `CACHE/shards/NAME-HASH/.andy/fetch.log` lists every download and eviction with the
process that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from andy_dist import UserError
from andy_dist.data.remote import FetchPolicy, RemoteFolder, is_url
from andy_dist.data.shard_format import MANIFEST, REMAKE, manifest_from_bytes

VERIFY_LEVELS = ("size", "once", "sha256", "full")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ANDY_CACHE_DIR") or Path.home() / ".cache" / "andy_dist")


@dataclass
class DataAccess:
    """How a process reaches a shard set: cache, credentials, retries, prefetching."""

    cache_dir: str | Path | None = None
    max_bytes: int | None = None  # cache size limit for one remote shard set (None: no limit)
    storage_options: dict = field(default_factory=dict)
    policy: FetchPolicy = field(default_factory=FetchPolicy)
    prefetch_shards: int = 4  # shards fetched (or verified) ahead of the read position
    prefetch: bool = False  # this process prefetches (one per node: local rank 0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for data in iter(lambda: handle.read(1 << 20), b""):
            digest.update(data)
    return digest.hexdigest()


def cache_root(cache_dir: str | Path | None, location: str) -> Path:
    """This node's folder for one shard set: named after it, keyed by its full location."""
    location = location.rstrip("/")
    if not is_url(location):
        location = str(Path(location).resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", location.rsplit("/", 1)[-1])[:40] or "data"
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "shards" / f"{slug}-{key}"


class NodeCache:
    """Locks, verification records and the fetch log of one shard set on this node."""

    def __init__(self, root: Path):
        self.root = root
        self.meta = root / ".andy"
        try:
            (self.meta / "locks").mkdir(parents=True, exist_ok=True)
            (self.meta / "verified").mkdir(exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot use the data cache {root} ({err.strerror}); set cache_dir=PATH to a "
                            f"writable node-local folder") from None

    def lock(self, name: str) -> FileLock:
        return FileLock(self.meta / "locks" / f"{name}.lock")

    def _record(self, name: str) -> Path:
        return self.meta / "verified" / f"{name}.json"

    @staticmethod
    def _identity(path: Path) -> dict:
        stat = path.stat()
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}

    def remembered(self, path: Path, name: str, sha256: str | None) -> bool:
        """True if `path` was verified against `sha256` and has not changed since."""
        try:
            record = json.loads(self._record(name).read_text())
            return record["sha256"] == sha256 and record["file"] == self._identity(path)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def remember(self, path: Path, name: str, sha256: str | None) -> None:
        record = self._record(name)
        tmp = record.with_name(f".{record.name}.{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps({"sha256": sha256, "file": self._identity(path), "path": str(path)}))
        os.replace(tmp, record)

    def forget(self, name: str) -> None:
        self._record(name).unlink(missing_ok=True)

    def log(self, event: str, name: str, size: int | None) -> None:
        env = os.environ
        line = {"time": round(time.time(), 3), "event": event, "file": name, "bytes": size,
                "host": socket.gethostname(), "pid": os.getpid(), "rank": env.get("RANK"),
                "local_rank": env.get("LOCAL_RANK")}
        with open(self.meta / "fetch.log", "a") as handle:
            handle.write(json.dumps(line) + "\n")

    def remove_leftovers(self) -> None:
        """Delete partial downloads of processes on this node that no longer run (killed mid-transfer)."""
        for part in self.root.glob(".*.part-*"):
            pid = part.name.rsplit(".part-", 1)[1].split("-")[0]
            if pid.isdigit() and not _running(int(pid)):
                part.unlink(missing_ok=True)


def _check_local_hash(path: Path, sha256: str | None) -> None:
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256:
        raise UserError(f"shard {path} is corrupt: its sha256 {digest[:12]} does not match the manifest's "
                        f"{sha256[:12]}; copy it again or {REMAKE}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardFiles:
    """One shard set's files for this process (see the module doc); picklable for DataLoader workers."""

    def __init__(self, location: str | Path, access: DataAccess | None = None, verify: str = "once"):
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        self.access = access or DataAccess()
        self.location, self.verify = str(location).rstrip("/"), verify
        self.remote = (RemoteFolder(self.location, self.access.storage_options, self.access.policy)
                       if is_url(self.location) else None)
        self.root = cache_root(self.access.cache_dir, self.location)
        self.directory = self.root if self.remote else Path(self.location)
        self._cache: NodeCache | None = None
        self._ready: set[str] = set()

    @property
    def cache(self) -> NodeCache:
        if self._cache is None:
            self._cache = NodeCache(self.root)
            if self.remote:
                self._cache.remove_leftovers()
        return self._cache

    def describe(self, name: str) -> str:
        """The file as the user knows it: its URL, or its local path."""
        return self.remote.url_of(name) if self.remote else str(self.directory / name)

    def path(self, name: str) -> Path:
        return self.directory / name

    # --- the manifest and optional files (fetched at every start; small) --------------------------
    def manifest(self) -> dict:
        if self.remote is None:
            from andy_dist.data.shard_format import read_manifest

            return read_manifest(self.directory)
        tmp = self._temporary(MANIFEST)
        self.remote.download(MANIFEST, tmp)
        try:
            return manifest_from_bytes(tmp.read_bytes(), self.describe(MANIFEST))
        finally:
            tmp.unlink(missing_ok=True)

    def optional(self, name: str) -> Path | None:
        """A local copy of `name` if the shard set holds it (e.g. tokenizer.model), else None."""
        if self.remote is None:
            path = self.directory / name
            return path if path.is_file() else None
        if not self.remote.exists(name):
            return None
        tmp = self._temporary(name)
        self.remote.download(name, tmp)
        os.replace(tmp, self.path(name))
        return self.path(name)

    def _temporary(self, name: str) -> Path:
        self.cache  # the folder exists (and leftovers of dead processes are gone)
        return self.root / f".{name}.part-{os.getpid()}-{threading.get_ident()}"

    # --- shards and lengths files ------------------------------------------------------------------
    def ensure(self, name: str, sha256: str | None, size: int | None, reason: str = "read",
               recheck: bool = False) -> Path:
        """The local path of `name`, verified as the module doc says (downloaded first when remote)."""
        path = self.path(name)
        if name in self._ready and not recheck:
            return path
        if self.remote is None and (self.verify != "once" or recheck):
            if recheck:  # sha256/full: hashed at every start, nothing remembered
                _check_local_hash(path, sha256)
            self._ready.add(name)
            return path
        with self.cache.lock(name):  # one process per node hashes or downloads; the others wait, then reuse
            if not self._usable(path, name, sha256, size, recheck):
                self._download(name, sha256, size, reason)
        self._ready.add(name)
        return path

    def open(self, name: str, sha256: str | None, size: int | None):
        """An open binary file of `name` (fetched again if the node's cache evicted it meanwhile)."""
        try:
            return open(self.ensure(name, sha256, size), "rb")
        except FileNotFoundError:
            self._ready.discard(name)
            return open(self.ensure(name, sha256, size), "rb")

    def _usable(self, path: Path, name: str, sha256: str | None, size: int | None, recheck: bool) -> bool:
        """The file is there and verified (now or remembered); a damaged cached copy is removed."""
        if not path.is_file():
            if self.remote is None:
                raise UserError(f"shard {path} is missing; restore it or {REMAKE}")
            return False
        actual = path.stat().st_size
        problem = f"size is {actual} bytes, the manifest says {size}" if size is not None and actual != size else None
        if problem is None and (recheck or not self.cache.remembered(path, name, sha256)):
            digest = file_sha256(path) if sha256 else None
            if digest != sha256:
                problem = f"sha256 {digest[:12]} does not match the manifest's {sha256[:12]}"
            else:
                self.cache.remember(path, name, sha256)
        if problem is None:
            return True
        if self.remote is None:
            raise UserError(f"shard {path} is corrupt: its {problem}; copy it again or {REMAKE}")
        print(f"warning: the cached copy {path} of {self.describe(name)} is damaged ({problem}); fetching it "
              f"again", file=sys.stderr, flush=True)
        self.cache.forget(name)
        path.unlink(missing_ok=True)
        self.cache.log("damaged", name, actual)
        return False

    def _download(self, name: str, sha256: str | None, size: int | None, reason: str) -> None:
        def check(copy: Path) -> str | None:
            got = copy.stat().st_size
            if size is not None and got != size:
                return f"the transfer gave {got} of {size} bytes"
            digest = file_sha256(copy) if sha256 else None
            if digest != sha256:
                return (f"the copy's sha256 {digest[:12]} differs from the manifest's {sha256[:12]} (was the file "
                        f"changed after the manifest was written?)")
            return None

        tmp = self._temporary(name)
        self.remote.download(name, tmp, check)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the record below vouches for these bytes: they must be on disk
        final = self.path(name)
        os.replace(tmp, final)
        self.cache.remember(final, name, sha256)
        self.cache.log(reason, name, size)

    def evict(self, name: str) -> int:
        """Delete this node's copy of `name` (remote sets only); returns the bytes freed."""
        with self.cache.lock(name):
            path = self.path(name)
            freed = path.stat().st_size if path.is_file() else 0
            path.unlink(missing_ok=True)
            self.cache.forget(name)
        self._ready.discard(name)
        if freed:
            self.cache.log("evict", name, freed)
        return freed

    def cached(self, name: str) -> bool:
        """Whether this node's cache holds a copy of `name` (remote sets)."""
        return self.remote is not None and self.path(name).is_file()

    def held(self, name: str) -> bool:
        """Whether reading `name` needs no download or hash now (a copy on this node, or verified here)."""
        return name in self._ready or self.cached(name)

    def __getstate__(self):  # a DataLoader worker (spawned) starts with nothing marked ready
        state = self.__dict__.copy()
        state["_ready"] = set()
        state["_cache"] = None
        return state
