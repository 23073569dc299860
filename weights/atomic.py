"""Writing files so that readers see the old ones or the finished new ones, never a part.

    with atomic_write("out/model.safetensors") as tmp:
        serialize_file(tensors, tmp)          # or: with open(tmp, "wb") as f: ...

    with atomic_files("out/gpt2", ["model.safetensors", "config.json"]) as tmp:
        ...write tmp["model.safetensors"], then tmp["config.json"]...

Every writer of gptspec (weights, checkpoints in other formats, conformance artifacts) goes
through here. The temporary files live in a hidden staging directory beside the destination,
`.<name>.gptspec-<host>-<pid>-<random>.partial/`, so that a library that makes temporaries of its
own next to the path it is given (safetensors' `.tmpXXXXXX`) makes them in there too. The staging
directory is removed on every exit Python sees (an exception, KeyboardInterrupt, SystemExit); one
left by a process that was killed outright is removed by the next write to the same destination
from this machine, once its process is gone.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Iterator, Sequence

PARTIAL_SUFFIX = ".partial"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGE = re.compile(r"^\.(?P<name>.+)\.gptspec-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.partial$")


def stage_name(name: str) -> str:
    """The staging directory's name for a destination called `name`: recognisably gptspec's, this
    machine's and this process's."""
    return f".{name}.gptspec-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def is_staging(path: str | os.PathLike) -> bool:
    """Whether `path` lies in (or is) a staging directory of an unfinished write."""
    return any(_STAGE.match(part) for part in Path(path).parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process, or not a pid at all
        return True
    return True


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove the staging directories for `name` in `parent` left by writers on this machine whose
    process is gone (killed before they could clean up). Others' and live writers' are left alone."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            m = _STAGE.match(entry.name)
            if m and m["name"] == name and m["host"] == _HOST and not _alive(int(m["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _stage(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, name)
    for _ in range(100):
        stage = parent / stage_name(name)
        try:
            stage.mkdir()
        except FileExistsError:
            continue
        except OSError as e:  # named by the directory the user gave, not by the staging name
            raise type(e)(e.errno, f"{e.strerror} (cannot write {name} there)", str(parent)) from None
        return stage
    raise FileExistsError(f"{parent}: could not find an unused staging name for {name}")


def _umask_mode(stage: Path) -> int:
    """0o666 less the umask: the mode of a file made by a plain open(). Learnt from a file the kernel
    makes, since reading the umask means setting it process-wide for a moment, which races."""
    probe = stage / ".mode"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _finish(tmp: Path, mode: int) -> None:
    # a library given the path may have put its own file there (safetensors makes it 0600)
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # the renames reach the disk with the directory; some filesystems cannot fsync one
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C during the renames that publish several files arrives after the last one, so that an
    interruption never leaves a mix of old and new files (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)
        elif received and previous != signal.SIG_IGN:
            raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary file for the body to write `dest` into (its directory made if missing).
    When the body finishes, the file is flushed to disk and renamed onto `dest`; when it raises
    anything (KeyboardInterrupt included), the temporary files are removed and `dest` is left as it
    was. The file gets the permissions of a plain open(): 0o666 less the umask."""
    dest = Path(dest)
    stage = _stage(dest.parent, dest.name)
    try:
        mode = _umask_mode(stage)
        tmp = stage / dest.name
        tmp.touch(mode=0o600)
        yield tmp
        _finish(tmp, mode)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Temporary files for `names` in `directory`, published together when the body finishes (and
    removed, leaving `directory` as it was, when it raises). The last name is the one a reader needs
    to take the directory as complete (config.json beside the weights).

    A new directory is written whole beside its destination and renamed into place: readers see no
    directory, or all of it. Into an existing one, the files are renamed over the old ones with the
    last name removed first and published last, Ctrl-C deferred until they are all in place: a reader
    sees the old files, the new ones, or for that instant no last name (a clear "incomplete"), never
    new weights beside an old config."""
    directory = Path(directory)
    fresh = not directory.exists()
    stage = _stage(directory.parent, directory.name) if fresh else _stage(directory, directory.name)
    try:
        mode = _umask_mode(stage)
        tmp = {name: stage / name for name in names}
        for path in tmp.values():
            path.touch(mode=0o600)
        yield tmp
        for path in tmp.values():
            _finish(path, mode)
        if fresh:
            # mkdir gave the staging directory the umask's mode already; made meanwhile by someone
            # else, the directory is published into file by file below
            with contextlib.suppress(OSError):
                os.rename(stage, directory)
                _fsync_dir(directory.parent)
                return
        with _interrupts_deferred():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / names[-1])
            for name in names:
                os.replace(tmp[name], directory / name)
        _fsync_dir(directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
