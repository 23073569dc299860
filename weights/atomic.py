"""Writing a file so that readers see the old one or the finished new one, never a part.

    with atomic_write("out/model.safetensors") as tmp:
        serialize_file(tensors, tmp)          # or: with open(tmp, "wb") as f: ...

Every writer of gptspec (weights, checkpoints in other formats, conformance artifacts) goes
through here.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

PARTIAL_SUFFIX = ".partial"


def _create_temporary(dest: Path) -> tuple[Path, int]:
    """A new empty file beside `dest`, and its permission bits: 0o666 less the umask.

    os.open with mode 0o666 lets the kernel apply the umask, as open() in any other tool does;
    tempfile.mkstemp would make the file 0600, and reading the umask to compute the mode means
    setting it process-wide for a moment, which races with other threads."""
    for _ in range(100):
        tmp = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{dest.parent}: could not find an unused temporary name for {dest.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary file beside `dest` (its directory made if missing) for the body to
    write. When the body finishes, the file is flushed to disk and renamed onto `dest`; when it
    raises anything (KeyboardInterrupt included), the temporary file is removed and `dest` is left
    as it was. The file gets the permissions of a plain open(): 0o666 less the umask."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(dest)
    try:
        yield tmp
        # a library given the path may have put its own file there (safetensors makes it 0600)
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # the rename itself reaches the disk with the directory; some filesystems cannot fsync one
    with contextlib.suppress(OSError):
        _fsync(dest.parent)
