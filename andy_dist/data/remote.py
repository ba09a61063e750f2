"""Shard sets in object storage or on a web server: single files fetched through fsspec, with retries.

`--data` may name a local folder or a URL that fsspec reads: `https://host/path/NAME`, `s3://bucket/prefix`
(s3fs; an S3-compatible endpoint through `--storage-options '{"endpoint_url": "http://..."}'` or the
usual `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` variables),
`gs://`, `hf://` and the rest of fsspec's protocols (each needs its own package: gcsfs, huggingface_hub).
Nothing here reads a shard's samples: `andy_dist.data.shard_cache` keeps each node's copies, verified.

A download is retried on errors that can pass (connection refused or reset, timeouts, a transfer cut
short, a server error): `retries` attempts, waiting `backoff_s`, then twice that, ... (at most 60 s)
between them. What cannot pass is not retried: a missing file (HTTP 404, no such key) and missing or
refused credentials. Each ends in one line naming the URL and the fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from andy_dist import UserError

MAX_BACKOFF_S = 60.0
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "NoAuthTokenError", "RefreshError", "DefaultCredentialsError"}
_CONNECTION_ERRORS = (ConnectionError, TimeoutError)


def is_url(location: str | Path) -> bool:
    """True for a location fsspec must open (`scheme://...`), False for a local path (or `file://`)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def parse_storage_options(text: str | None) -> dict:
    """`--storage-options` (a JSON object, passed to fsspec) -> dict; a UserError when it is not one."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--storage-options is not valid JSON ({err}); pass an object such as "
                        f"'{{\"endpoint_url\": \"http://host:9000\"}}'") from None
    if not isinstance(value, dict):
        raise UserError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 5
    """Attempts per file before giving up (errors that can pass only)."""
    backoff_s: float = 2.0
    """Wait after the first failed attempt; doubled after each further one (at most 60 s)."""

    def waits(self) -> list[float]:
        return [min(MAX_BACKOFF_S, self.backoff_s * 2 ** i) for i in range(max(0, self.retries - 1))]


@dataclass
class RemoteFolder:
    """A folder URL; `download(name, dest)` copies one file of it to a local path."""

    url: str
    storage_options: dict = field(default_factory=dict)
    policy: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self._fs: tuple[int, object, str] | None = None  # (pid, filesystem, root path): one per process

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _filesystem(self):
        import os

        import fsspec

        if self._fs is None or self._fs[0] != os.getpid():
            try:
                fs, root = fsspec.url_to_fs(self.url, **self.storage_options)
            except (ImportError, ValueError) as err:  # an unknown protocol, or its package is not installed
                raise UserError(f"cannot open {self.url}: {err}") from None
            self._fs = (os.getpid(), fs, root.rstrip("/"))
        return self._fs[1], self._fs[2]

    def download(self, name: str, dest: Path, check: Callable[[Path], str | None] | None = None) -> None:
        """Copy `name` to `dest`, retrying errors that can pass. `check(dest)` returns a problem (the copy is
        short or differs from the manifest) or None. On failure `dest` does not exist."""
        url, started, last = self.url_of(name), time.monotonic(), ""
        waits = self.policy.waits()
        for attempt in range(len(waits) + 1):
            try:
                fs, root = self._filesystem()
                fs.get_file(f"{root}/{name}", str(dest))
                problem = check(dest) if check is not None else None
                if problem is None:
                    return
                last = problem
            except Exception as err:  # noqa: BLE001 - sorted below into final and passing failures
                _raise_if_final(err, url)
                last = _describe(err)
            dest.unlink(missing_ok=True)
            if attempt < len(waits):
                time.sleep(waits[attempt])
        raise UserError(f"cannot fetch {url}: {last} (after {len(waits) + 1} attempts over "
                        f"{time.monotonic() - started:.0f} s); check that the server is up and reachable from this "
                        f"node, then run again (training continues with --resume)")

    def exists(self, name: str) -> bool:
        """Whether `name` is in the folder (False also when the server cannot say: the caller falls back)."""
        try:
            fs, root = self._filesystem()
            return bool(fs.exists(f"{root}/{name}"))
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - an optional file: its absence is not an error
            return False


def _chain(err: BaseException) -> list[BaseException]:
    found = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _raise_if_final(err: Exception, url: str) -> None:
    """A UserError for failures no retry can mend: missing credentials or access, a missing file."""
    chain = _chain(err)
    names = {type(e).__name__ for e in chain}
    if names & _CREDENTIAL_ERRORS:
        raise UserError(f"no credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                        f"AWS_PROFILE), or pass --storage-options '{{\"key\": ..., \"secret\": ...}}' "
                        f"('{{\"anon\": true}}' for a public bucket)") from None
    if any(isinstance(e, PermissionError) or getattr(e, "status", None) in (401, 403) for e in chain):
        raise UserError(f"access to {url} was refused ({_describe(err)}); check the credentials and the "
                        f"bucket's permissions") from None
    transient = any(isinstance(e, _CONNECTION_ERRORS) or "Connect" in type(e).__name__ for e in chain[1:])
    if isinstance(err, FileNotFoundError) and not transient:
        raise UserError(f"{url} does not exist (not found on the server); check --data, or upload the whole "
                        f"shard set written by tools/make_shards.py") from None
    if isinstance(err, UserError):
        raise err


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
