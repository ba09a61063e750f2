"""Reading documents from the user's text: .txt files, .jsonl files, directories and globs.

One reader for every tool (tokenizer training, shard writing), so both see the same documents
in the same order. A `.txt` file is one document; a `.jsonl` file holds one document per line in
the field `text`. Directories are walked for both kinds, in sorted order, so runs are repeatable.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from andy_dist import UserError

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    source: str  # "path" or "path:line"
    text: str


def resolve_inputs(paths: Iterable[str]) -> list[Path]:
    """Expand directories and globs into a sorted, de-duplicated list of .txt/.jsonl files."""
    files: list[Path] = []
    for raw in paths:
        matches = sorted(glob.glob(raw, recursive=True)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise UserError(f"input {raw!r} matches no file; check the pattern")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
                if not found:
                    raise UserError(f"input directory {path} holds no .txt or .jsonl files")
                files.extend(found)
            elif path.is_file():
                if path.suffix not in TEXT_SUFFIXES:
                    raise UserError(f"input {path} is neither .txt nor .jsonl; convert it or rename it")
                files.append(path)
            else:
                raise UserError(f"input {path} does not exist")
    unique = list(dict.fromkeys(files))
    return unique


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8 first") from None


def iter_documents(files: Iterable[Path]) -> Iterator[Document]:
    for path in files:
        if path.suffix == ".txt":
            yield Document(str(path), _read_text(path))
            continue
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise UserError(f"{path}:{number} is not valid JSON ({err}); fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"{path}:{number} has no string field 'text'; each line must be {{\"text\": ...}}")
                yield Document(f"{path}:{number}", record["text"])


def read_documents(paths: Iterable[str]) -> Iterator[Document]:
    return iter_documents(resolve_inputs(paths))


def total_bytes(files: Iterable[Path]) -> int:
    return sum(os.path.getsize(f) for f in files)


def write_default_corpus(out: str | Path, max_bytes: int = 3_000_000) -> Path:
    """The built-in corpus: source files of the Python standard library, one document each.

    Every Python install carries this text, so the main job runs on a fresh machine with no
    download. Files are taken in sorted order until `max_bytes`, so the corpus is the same on
    every machine with the same Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
            if any(part.startswith("test") for part in path.relative_to(stdlib).parts):
                continue  # test data holds odd encodings and generated text
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += len(text.encode("utf-8"))
            if written >= max_bytes:
                break
    os.replace(tmp, out)
    return out
