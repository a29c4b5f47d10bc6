"""Stages held as mappings of the store's files: the page cache's pages are the weights.

Resident stages are kept this way rather than read into fresh memory. Measured on the 2-core EPYC VM
(782 MB of BERT-large stages, cold cache each time):
- faulting fresh anonymous memory in cost 1.4-3.7 s of CPU per GB (the host backs guest pages
  lazily), and O_DIRECT reads into it ran at 0.44-0.56 GB/s;
- mapping the files and populating the mappings (``MADV_POPULATE_READ``) read at 1.25-1.48 GB/s for
  0.14 s of CPU per GB: the disk fills page-cache pages that are mapped as they are, nothing is
  zeroed or copied. But the guest's first touch of each such page still costs about 1 s per GB on
  this VM (``MappedRange.touch``), so the mapping saves the zeroing, not the hypervisor's share.
Matmuls over touched mapped pages ran as fast as over anonymous huge pages (GPT-2-XL's second and
third forwards: 4.2-4.8 s either way).
The mappings are private and writable so that tensors can view them (a write would copy one page;
nothing writes weights). Clean file pages are also what the kernel may reclaim under pressure, and
a reclaimed page is read back from the store on its next use.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hermesd.errors import StageIntegrityError

# MADV_POPULATE_READ (Linux 5.14): fault the range in, reading the file as needed; errors (EIO, a
# file cut short) come back as OSError rather than as SIGBUS in whichever thread touches the page.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


@dataclass
class MappedRange:
    """One page-aligned range of a file, mapped privately: ``view`` starts at file offset ``offset``."""

    path: Path
    offset: int
    memory: mmap.mmap

    @classmethod
    def of_file(cls, fd: int, path: Path, start: int, end: int) -> "MappedRange":
        """Map [start, end) of the open file ``fd`` (``start`` page-aligned, ``end`` within the file)."""
        memory = mmap.mmap(fd, end - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=start)
        return cls(path, start, memory)

    @property
    def view(self) -> memoryview:
        return memoryview(self.memory)

    def populate(self) -> None:
        """Read the range into memory now (from the page cache, or the disk when it is cold), then touch
        every page from this thread (see ``touch``)."""
        try:
            self.memory.madvise(MADV_POPULATE_READ)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a kernel without it: touching reads it
                raise
            self.memory.madvise(mmap.MADV_WILLNEED)
        self.touch()

    def touch(self) -> None:
        """Read one byte of every page. On a VM, a guest page the disk has just filled still costs its
        first CPU access (the hypervisor maps it then): about 1 s per GB here, measured on GPT-2-XL's
        6.4 GB. Untouched, the compute threads paid it: the first forward took 9.3-16.5 s instead of
        4.4 s. Touched here, the cost stays on this thread."""
        pages = torch.frombuffer(self.memory, dtype=torch.uint8)[:: mmap.PAGESIZE]
        int(pages.sum())

    def drop(self) -> None:
        """Unmap the pages and drop them from the page cache: the memory is the kernel's again now."""
        try:
            self.memory.madvise(mmap.MADV_DONTNEED)  # a later touch re-reads the file: never zeros
        except (OSError, ValueError):  # already closed
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # the file was removed: its pages go with the last mapping
            return
        try:
            os.posix_fadvise(fd, self.offset, len(self.memory), os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class FirstRead:
    """What populating a mapped stage took (perf_counter seconds; CPU time of the populating thread)."""

    bytes_read: int
    load_start: float
    load_end: float
    cpu_s: float


class MappedStage:
    """A stage's tensors as views of file mappings (its own file, and a range of each tied owner)."""

    def __init__(self, name: str, file: str, ranges: list[MappedRange], tensors: dict[str, torch.Tensor],
                 nbytes: int, check: Callable[[], None]) -> None:
        self.name = name
        self.file = file
        self.ranges = ranges
        self.tensors = tensors
        self.nbytes = nbytes
        self._check = check

    def populate(self) -> FirstRead:
        """Read every range into memory, then check the file's header against the manifest.

        A file cut short or unreadable since it was mapped raises StageIntegrityError. (Populating comes
        first: touching a mapped page past a file's new end would be SIGBUS, not an error.)"""
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            for mapped in self.ranges:
                mapped.populate()
        except OSError as exc:
            raise StageIntegrityError(self.name, self.file, f"cannot read it ({exc.strerror or exc})") from None
        self._check()
        return FirstRead(self.nbytes, started, time.perf_counter(), time.thread_time() - cpu)

    def drop(self) -> None:
        for mapped in self.ranges:
            mapped.drop()
