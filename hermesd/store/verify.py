"""Integrity of stage files: sha256 once per version of a file, not on every streamed read.

Hashing runs at ~1.7 GB/s per core here, about the disk's speed, so hashing every streamed read would
take a core away from compute. A file's sha256 is therefore checked the first time a version of it
is read, where a version is its stat signature (inode, size, mtime, ctime). Writing to a file changes
its ctime, which no user can set back, so any alteration is hashed again. Convert records
the signatures of the files it wrote; the engine adds files it has verified.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from hermesd.store.manifest import Manifest

VERIFIED_NAME = ".verified.json"


def signature(stat: os.stat_result) -> list[int]:
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def record_verified(store_dir: Path, manifest: Manifest) -> None:
    """Trust the stage files as they are now (called by convert right after writing them)."""
    records = {s.file: signature(os.stat(store_dir / s.file)) for s in manifest.stages}
    _write_records(store_dir, records)


def _write_records(store_dir: Path, records: dict[str, list[int]]) -> None:
    temporary = store_dir / f"{VERIFIED_NAME}.{os.getpid()}.{threading.get_ident()}"
    temporary.write_text(json.dumps(records), encoding="utf-8")
    os.replace(temporary, store_dir / VERIFIED_NAME)


class Verifier:
    """Remembers which file versions were hashed; persists that in the store when it is writable."""

    def __init__(self, store_dir: Path) -> None:
        self._store_dir = store_dir
        self._lock = threading.Lock()
        try:
            loaded = json.loads((store_dir / VERIFIED_NAME).read_text(encoding="utf-8"))
            self._trusted = {k: list(v) for k, v in loaded.items() if isinstance(v, list) and len(v) == 4}
        except (OSError, ValueError, AttributeError):
            self._trusted = {}  # a cache: when unreadable, files are simply hashed again

    def needs_hash(self, relative: str, stat: os.stat_result) -> bool:
        with self._lock:
            return self._trusted.get(relative) != signature(stat)

    def mark_verified(self, relative: str, stat: os.stat_result) -> None:
        with self._lock:
            self._trusted[relative] = signature(stat)
            try:
                _write_records(self._store_dir, dict(self._trusted))
            except OSError:
                pass  # read-only store: the record stays in memory for this process
