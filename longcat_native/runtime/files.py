"""Writing output files so that nothing is lost: atomically, with the usual permissions.

Every file the project writes (latents, videos, benchmark results, profiler traces) goes to a
temporary file in the destination's own folder and is renamed over the destination only once it
is complete (and, where a check is given, valid). An interrupted or failed write (an exception,
Ctrl-C, a writer process that fails) removes the temporary file and leaves a previous file at the
destination byte-identical; a reader never sees a half-written file. The rename is atomic because
the temporary file is on the same file system (same folder).

The temporary file ends with the destination's name (``.tmp-<random>-video.mp4``), so tools that
pick a format from the suffix (ffmpeg, ``torch.profiler``'s ``.gz`` traces) write the right one.
Finished files get the permissions a plain ``open(path, "w")`` gives (``0o666`` less the umask),
not the ``0o600`` of ``tempfile.mkstemp``.

Use::

    with atomic_output("out.safetensors") as tmp:
        save_file(tensors, tmp)             # anything that writes a file at a path

    write_text_atomic("results.md", text)
    write_json_atomic("results.json", obj, indent=2)

    with atomic_folder("weights/saved") as tmp:   # several files that belong together (a model save)
        write_the_files_into(tmp)               # renamed into place as one unit, or not at all
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

__all__ = ["atomic_output", "atomic_folder", "write_bytes_atomic", "write_text_atomic", "write_json_atomic",
           "check_output_path", "check_mp4", "default_file_mode"]

PathLike = Union[str, os.PathLike]
_TMP_PREFIX = ".tmp-"


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else by the
    usual set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a new file gets from ``open(path, "w")``: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def check_output_path(path: PathLike, *, suffixes: Optional[Sequence[str]] = None, make_parent: bool = False,
                      what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written: not a folder, its folder exists (or is
    created with ``make_parent``) and is writable, and its suffix is one of ``suffixes``. Returns
    the path (``~`` expanded); raises ValueError naming the problem."""
    p = Path(os.fspath(path)).expanduser()
    if suffixes is not None and p.suffix.lower() not in tuple(s.lower() for s in suffixes):
        raise ValueError(f"{what} {str(p)!r} must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder; name a file")
    parent = p.parent
    if not parent.exists():
        if not make_parent:
            raise ValueError(f"{what} {str(p)!r}: the folder {str(parent)!r} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{what} {str(p)!r}: cannot create the folder {str(parent)!r} ({e})") from None
    if not parent.is_dir():
        raise ValueError(f"{what} {str(p)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(p)!r}: the folder {str(parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        # Renaming over a read-only file would succeed; refusing keeps the owner's intent.
        raise ValueError(f"{what} {str(p)!r} exists and is not writable")
    return p


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or nothing better to do while another error propagates


@contextlib.contextmanager
def atomic_output(path: PathLike, *, validate: Optional[Callable[[str], None]] = None, make_parent: bool = False,
                  allow_empty: bool = False, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block exits normally and the temporary
    file exists, is not empty and passes ``validate(tmp)`` (which raises to reject it), it is
    given the default permissions and renamed over ``path``. On any exception (KeyboardInterrupt
    included), or if the file is missing, empty or rejected, the temporary file is removed and
    ``path`` is left as it was.

    The temporary file is created empty (so its name is reserved); the writer may open and
    truncate it, or replace it (e.g. by its own temporary file and rename) — either works.
    ``make_parent`` creates the destination's folder first; ``allow_empty`` accepts an empty file.
    ``fsync`` flushes the file (and the folder entry) to disk before and after the rename."""
    dest = Path(os.fspath(path)).expanduser()
    if dest.is_dir():
        raise IsADirectoryError(f"cannot write {str(dest)!r}: it is a folder")
    folder = dest.parent
    if make_parent:
        folder.mkdir(parents=True, exist_ok=True)
    mode = default_file_mode()
    for _ in range(100):
        tmp = folder / f"{_TMP_PREFIX}{secrets.token_hex(4)}-{dest.name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"cannot create a temporary file next to {str(dest)!r}")
    try:
        yield str(tmp)
        if not tmp.is_file():
            raise OSError(f"writing {str(dest)!r}: the writer left no file")
        if not allow_empty and tmp.stat().st_size == 0:
            raise OSError(f"writing {str(dest)!r}: the writer left an empty file")
        if validate is not None:
            validate(str(tmp))
        os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_dir(folder)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(path: PathLike, *, make_parent: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``path`` (``.tmp-<random>-<name>``); when the
    block exits normally the folder takes ``path``'s place as one unit, a previous folder there
    included (which is then deleted). On any exception (KeyboardInterrupt included) the temporary
    folder is deleted and ``path`` is left as it was.

    Why a folder and not its files one by one: a model save is several files that only make sense
    together (weights, config, description); replaced file by file, an interruption between two
    leaves a folder that reads as a mix of two saves. Here a reader sees the old folder or the new
    one. Replacing an existing folder takes two renames (POSIX cannot rename over a non-empty
    folder): the old one is moved aside to ``.old-<random>-<name>``, then the new one into place;
    an interruption between the two leaves no folder at ``path`` (a clear "not found", never a
    mix) with both complete folders beside it. Deciding whether ``path`` may be replaced is the
    caller's (``save_quantized`` refuses a folder it did not write)."""
    dest = Path(os.path.realpath(Path(os.fspath(path)).expanduser()))
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"cannot write the folder {str(dest)!r}: it is a file")
    parent = dest.parent
    if make_parent:
        parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = parent / f"{_TMP_PREFIX}{secrets.token_hex(4)}-{dest.name}"
        try:
            os.mkdir(tmp)  # the default mode, as a plain mkdir gives (0o777 less the umask)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"cannot create a temporary folder next to {str(dest)!r}")
    old = None
    try:
        yield tmp
        if fsync:
            for f in tmp.iterdir():
                if f.is_file():
                    _fsync_file(f)
            _fsync_dir(tmp)
        if dest.exists():
            old = parent / f".old-{secrets.token_hex(4)}-{dest.name}"
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists() and old.exists():
            os.rename(old, dest)  # the swap failed half way: the previous folder goes back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: PathLike, data: bytes, **kwargs) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`); returns the path."""
    kwargs.setdefault("allow_empty", True)
    with atomic_output(path, **kwargs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return os.fspath(Path(os.fspath(path)).expanduser())


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8", **kwargs) -> str:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`); returns the path."""
    return write_bytes_atomic(path, text.encode(encoding), **kwargs)


def write_json_atomic(path: PathLike, obj: Any, *, make_parent: bool = False, fsync: bool = True,
                      **dump_kwargs) -> str:
    """``json.dump(obj, **dump_kwargs)`` to ``path`` atomically; the object is serialized first, so
    an unserializable value leaves ``path`` untouched."""
    text = json.dumps(obj, **dump_kwargs)
    return write_text_atomic(path, text, make_parent=make_parent, fsync=fsync)


def check_mp4(path: PathLike) -> None:
    """A finished MP4 is a sequence of whole top-level boxes with ``ftyp``, ``mdat`` and ``moov``
    (ffmpeg writes ``moov`` last, so a killed or failed encode lacks it: "moov atom not found")."""
    size = os.path.getsize(path)
    seen, pos = set(), 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                break
            box_size, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if box_size == 1 and len(head) == 16:  # 64-bit size
                box_size = int.from_bytes(head[8:16], "big")
            elif box_size == 0:  # extends to the end of the file
                box_size = size - pos
            if box_size < 8 or pos + box_size > size:
                raise OSError(f"the encoded video is incomplete (box {kind!r} at byte {pos} overruns the file)")
            seen.add(kind)
            pos += box_size
    missing = [k.decode() for k in (b"ftyp", b"mdat", b"moov") if k not in seen]
    if missing or pos != size:
        raise OSError(f"the encoded video is incomplete (missing MP4 boxes: {missing or 'none'}); ffmpeg failed")
