"""Reading stages from a store: positioned reads into pool buffers, views instead of copies.

A stage's own file is read as one prefix (header + every tensor except row-gathered embedding
tables); a tied tensor is read as an aligned range of its owner's file. With O_DIRECT the page
cache is bypassed; where a filesystem refuses O_DIRECT (tmpfs), buffered reads are followed by
``POSIX_FADV_DONTNEED`` so streamed weights do not pile up in the page cache. Resident stages are
mapped instead of read (``map``; engine.mapped says why).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hermesd.engine.bufferpool import PAGE, map_memory, round_up
from hermesd.engine.mapped import MappedRange, MappedStage
from hermesd.errors import StageIntegrityError
from hermesd.store.manifest import Manifest, StageEntry, TensorEntry
from hermesd.store.safetensors_io import ST_TO_TORCH, parse_header, tensor_view
from hermesd.store.verify import Verifier

CHUNK = 64 << 20  # bytes per read syscall: large enough for full disk speed, bounded for the kernel


@dataclass(frozen=True)
class _TiedRead:
    local: str
    owner: StageEntry
    tensor: TensorEntry


@dataclass(frozen=True)
class _StagePlan:
    entry: StageEntry
    prefix_end: int  # own file bytes to read: everything but gathered tables
    tied: tuple[_TiedRead, ...]
    span: int  # buffer bytes needed for the prefix and all tied ranges

    @property
    def read_bytes(self) -> int:
        return self.prefix_end + sum(t.tensor.nbytes for t in self.tied)


class StageReader:
    """Loads stages of one store into caller-provided buffers; checks integrity as it reads."""

    def __init__(self, store_dir: str | os.PathLike[str], manifest: Manifest, direct: bool | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.manifest = manifest
        self._plans = {entry.name: self._plan(entry) for entry in manifest.stages}
        self._verifier = Verifier(self.store_dir)
        self.direct = self._probe_direct() if direct is None else direct

    @property
    def read_mode(self) -> str:
        return "direct" if self.direct else "buffered"

    def span(self, name: str) -> int:
        """Buffer bytes a load of stage ``name`` needs."""
        return self._plans[name].span

    def read_bytes(self, name: str) -> int:
        """Bytes of weights one load of ``name`` brings in (its memory use, rounded for alignment)."""
        return self._plans[name].read_bytes

    def _plan(self, entry: StageEntry) -> _StagePlan:
        gathered = [entry.tensors[n].offsets[0] for n in entry.gather if n in entry.tensors]
        prefix_end = entry.data_start + min(gathered) if gathered else entry.bytes
        tied = tuple(
            _TiedRead(local, self.manifest.stage(ref.stage), self.manifest.tensor_of(ref))
            for local, ref in entry.tied.items()
        )
        span = round_up(prefix_end) + sum(round_up(t.tensor.nbytes) + 2 * PAGE for t in tied)
        return _StagePlan(entry, prefix_end, tied, span)

    def read(self, name: str, view: memoryview) -> tuple[dict[str, torch.Tensor], int]:
        """Fill ``view`` (page-aligned) with stage ``name``; return tensor views into it and the bytes read."""
        plan = self._plans[name]
        if len(view) < plan.span:
            raise ValueError(f"region of {len(view)} bytes cannot hold stage {name} ({plan.span})")
        self._read_range(plan.entry, 0, plan.prefix_end, view[: round_up(plan.prefix_end)])
        tensors = self._own_views(plan, view)
        cursor, total = round_up(plan.prefix_end), plan.prefix_end
        for tied in plan.tied:
            start = tied.owner.data_start + tied.tensor.offsets[0]
            aligned = start - start % PAGE
            length = round_up(start + tied.tensor.nbytes) - aligned
            self._read_range(tied.owner, aligned, start + tied.tensor.nbytes, view[cursor : cursor + length])
            tensors[tied.local] = tensor_view(view, cursor + start - aligned, tied.tensor)
            cursor, total = cursor + length, total + tied.tensor.nbytes
        return tensors, total

    def map(self, name: str) -> MappedStage:
        """Stage ``name`` as private mappings of its files, with tensor views of them; nothing is read
        yet (``MappedStage.populate`` reads and checks the header). Same tensors as ``read``."""
        plan = self._plans[name]
        own = self._map_range(plan.entry, 0, plan.prefix_end)
        tensors = self._views(plan.entry, own.view)
        ranges = [own]
        for tied in plan.tied:
            start = tied.owner.data_start + tied.tensor.offsets[0]
            mapped = self._map_range(tied.owner, start, start + tied.tensor.nbytes)
            tensors[tied.local] = tensor_view(mapped.view, start - mapped.offset, tied.tensor)
            ranges.append(mapped)
        return MappedStage(name, plan.entry.file, ranges, tensors, plan.read_bytes,
                           check=lambda: self._check_header(plan.entry, own.view[: plan.prefix_end]))

    def _map_range(self, entry: StageEntry, start: int, end: int) -> MappedRange:
        """[start, end) of ``entry``'s file, widened to whole pages (within the file), mapped privately."""
        path = self.store_dir / entry.file
        fd = self._open_checked(entry, path, direct=False)
        try:
            return MappedRange.of_file(fd, path, start - start % PAGE, min(round_up(end), entry.bytes))
        finally:
            os.close(fd)

    def _own_views(self, plan: _StagePlan, view: memoryview) -> dict[str, torch.Tensor]:
        self._check_header(plan.entry, view[: plan.prefix_end])
        return self._views(plan.entry, view)

    @staticmethod
    def _check_header(entry: StageEntry, prefix: memoryview) -> None:
        try:
            header, data_start = parse_header(prefix)
        except (ValueError, KeyError) as exc:
            raise StageIntegrityError(entry.name, entry.file, f"corrupt header: {exc}") from None
        if header != entry.tensors or data_start != entry.data_start:
            raise StageIntegrityError(entry.name, entry.file, "header does not match the manifest (file replaced?)")

    @staticmethod
    def _views(entry: StageEntry, view: memoryview) -> dict[str, torch.Tensor]:
        return {
            local: tensor_view(view, entry.data_start + t.offsets[0], t)
            for local, t in entry.tensors.items() if local not in entry.gather
        }

    def _read_range(self, entry: StageEntry, start: int, end: int, target: memoryview) -> None:
        """Fill ``target`` from ``entry``'s file at ``start``; at least [start, end) must exist.

        ``target`` may extend past ``end`` (O_DIRECT lengths are page multiples); the file's end
        legitimately cuts such a read short.
        """
        path = self.store_dir / entry.file
        fd = self._open_checked(entry, path, direct=self.direct)
        try:
            got = _pread_full(fd, target, start)
            if not self.direct:
                os.posix_fadvise(fd, start, len(target), os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if got < end - start:
            raise StageIntegrityError(entry.name, entry.file, f"short read: {got} of {end - start} bytes")

    def _open_checked(self, entry: StageEntry, path: Path, direct: bool) -> int:
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise StageIntegrityError(entry.name, entry.file, "file is missing") from None
        except OSError as exc:
            raise StageIntegrityError(entry.name, entry.file, f"cannot open: {exc.strerror}") from None
        stat = os.fstat(fd)
        if stat.st_size != entry.bytes:
            os.close(fd)
            raise StageIntegrityError(
                entry.name, entry.file, f"size {stat.st_size} bytes, manifest says {entry.bytes} (truncated or altered)")
        if self._verifier.needs_hash(entry.file, stat):
            try:
                self._check_sha256(entry, path)
            except BaseException:
                os.close(fd)
                raise
            self._verifier.mark_verified(entry.file, stat)
        return fd

    def _check_sha256(self, entry: StageEntry, path: Path) -> None:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(16 << 20):
                digest.update(chunk)
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if digest.hexdigest() != entry.sha256:
            raise StageIntegrityError(
                entry.name, entry.file,
                f"sha256 {digest.hexdigest()[:16]}… does not match the manifest's {entry.sha256[:16]}… (altered)")

    def read_rows(self, name: str, local: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of a gathered embedding table, as a new [len(rows), ...] tensor."""
        entry = self._plans[name].entry
        table = entry.tensors[local]
        if rows and (rows[0] < 0 or rows[-1] >= table.shape[0]):
            raise IndexError(f"{name}.{local}: row index out of range (table has {table.shape[0]} rows)")
        out = torch.empty([len(rows), *table.shape[1:]], dtype=ST_TO_TORCH[table.dtype])
        row_bytes = table.nbytes // table.shape[0]
        target = memoryview(out.view(-1).view(torch.uint8).numpy()) if rows else memoryview(b"")
        base = entry.data_start + table.offsets[0]
        fd = self._open_checked(entry, self.store_dir / entry.file, direct=False)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: rows are scattered
            for first, count, at in _runs(rows):
                offset, length = base + first * row_bytes, count * row_bytes
                _pread_full(fd, target[at * row_bytes : at * row_bytes + length], offset)
                # DONTNEED drops only whole pages inside the range: widen it to page boundaries.
                start = offset - offset % PAGE
                os.posix_fadvise(fd, start, round_up(offset + length) - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return out

    def _probe_direct(self) -> bool:
        """True when the store's filesystem accepts O_DIRECT reads into our aligned buffers."""
        probe = map_memory(PAGE)
        try:
            fd = os.open(self.store_dir / self.manifest.stages[0].file, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return False
        try:
            os.preadv(fd, [memoryview(probe)], 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def _pread_full(fd: int, target: memoryview, offset: int) -> int:
    """Positioned reads until ``target`` is full or the file ends; returns bytes read.

    A read shorter than asked means the end of the file: asking again would be an unaligned
    O_DIRECT read, which some filesystems refuse.
    """
    done = 0
    while done < len(target):
        asked = min(CHUNK, len(target) - done)
        count = os.preadv(fd, [target[done : done + asked]], offset + done)
        done += count
        if count < asked:
            break
    return done


def _runs(rows: list[int]):
    """Consecutive runs in sorted ``rows``: (first row, run length, position in the output)."""
    at = 0
    while at < len(rows):
        end = at
        while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
            end += 1
        yield rows[at], end - at + 1, at
        at = end + 1
