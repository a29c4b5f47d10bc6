"""Images for classification: from bytes sent in a message, or from files under allowed directories.

Bytes are the normal way: a client sends the image itself, and the daemon reads no file for it. File
paths are for local tools (``hermesd run``) and, in the daemon, only under the directories its config
allows (``image_dirs``; none by default). Either way an image is bounded in bytes and in pixels before
it is decoded, and every refusal has one message, so a client learns nothing about which files exist.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermesd.errors import TaskError

MAX_IMAGE_BYTES = 32 << 20      # the most any image may be, whatever the config says
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImagePolicy:
    """Where image files may come from and how large an image may be.

    ``dirs``: None lets any path the process can read through (the CLI, run as the user); a tuple
    allows only files whose directory resolves to one of them or below (the daemon; empty: no files).
    """

    dirs: tuple[Path, ...] | None = None
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def refused(index: int, policy: ImagePolicy) -> TaskError:
    return TaskError(f"image {index}: not allowed or not readable (an image of at most {policy.max_bytes} bytes "
                     f"and {policy.max_pixels} pixels, as bytes or a regular file in an allowed directory)")


def allowed_path(path: str, policy: ImagePolicy) -> str | None:
    """The path to open (its directory resolved) if ``policy`` allows files there, else None."""
    if not isinstance(path, str) or "\0" in path or not path:
        return None
    if policy.dirs is None:
        return path
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    inside = any(directory == str(d) or directory.startswith(str(d).rstrip("/") + "/") for d in policy.dirs)
    return os.path.join(directory, os.path.basename(path)) if inside else None


def image_pixels(data: bytes) -> int | None:
    """Width × height from the image's header (nothing is decoded), or None if it is not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return width * height


def open_images(items: list[Any], policy: ImagePolicy) -> list[Any]:
    """RGB images for ``items`` (bytes, or file paths the policy allows); TaskError for any refusal."""
    try:
        from PIL import Image
    except ImportError:
        raise TaskError("image classification needs Pillow: pip install pillow") from None
    images = []
    for index, item in enumerate(items):
        if isinstance(item, bytes):
            data = item if len(item) <= policy.max_bytes else None
        else:
            path = allowed_path(item, policy)
            data = read_regular_file(path, policy.max_bytes) if path is not None else None
        pixels = image_pixels(data) if data is not None else None
        if pixels is None or pixels > policy.max_pixels:
            raise refused(index, policy)
        try:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise refused(index, policy) from None
    return images


def read_regular_file(path: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes | None:
    """The bytes of a regular file of at most ``max_bytes``, or None.

    Opened without following a final symlink and without blocking, then checked to be a regular file:
    a FIFO would otherwise hold the executor until someone writes to it, and a device never ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError, TypeError):  # ValueError: a NUL in the path
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, 1 << 20)):  # a file may grow while read
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks) if size <= max_bytes else None
