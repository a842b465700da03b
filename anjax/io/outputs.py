"""Output files and directories written atomically, with the user's umask.

A file is written to an anonymous file in its directory (O_TMPFILE, Linux; else a
hidden temporary sibling) and renamed over the target: a reader, or a run killed
-9 half-way, sees the old file or the new one, never a mix. An exported
directory is built in a hidden sibling and swapped in (renameat2 RENAME_EXCHANGE
where the kernel has it), so the previous directory stays whole until the new
one is complete. Files get 0666 & ~umask and directories 0777 & ~umask, as
`open`/`mkdir` would give them (tempfile alone gives 0600/0700).

An export directory carries MARKER, the list of files anjax wrote; `replace_dir`
replaces only such a directory holding nothing else (or an empty one): anything
a user put there is never deleted. With `force`, a directory that is not anjax's
is moved aside to `<dir>.replaced-<time>` rather than deleted.

The output-safety rule every command follows (`check_output`): an output path is
never empty, never the working directory or a directory holding it, and never
one of the command's inputs (compared after resolving symlinks, hard links
included). A training run directory (`claim_run_dir`) is empty, new, or carries
RUN_MARKER (or a checkpoint of an older run): a folder of the user's is refused.

After `interrupt()` (a command's Ctrl-C handler calls it) nothing is put in place any more: a write
or an export that goes on past the signal raises KeyboardInterrupt at its commit point. A write that
runs out of space raises OSError(ENOSPC) naming the target (`naming_full_disk`), the previous file or
directory untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER = ".anjax-export"
RUN_MARKER = ".anjax-run"
_TMP = ".anjax-tmp"
_interrupted = threading.Event()


def interrupt() -> None:
    """The user interrupted the command: from now on every commit point raises KeyboardInterrupt."""
    _interrupted.set()


def _commit_point() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt


def is_full_disk(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, failed for lack of space: OSError ENOSPC, or a
    library's error saying so (safetensors', orbax/tensorstore's)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike):
    """Re-raise a failure for lack of space (`is_full_disk`) as OSError(ENOSPC) naming `path`."""
    try:
        yield
    except Exception as e:
        if is_full_disk(e):
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from None
        raise


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _libc():
    return ctypes.CDLL(None, use_errno=True)


_AT_FDCWD, _AT_SYMLINK_FOLLOW, _RENAME_EXCHANGE = -100, 0x400, 2


def _link_into_place(fd: int, path: Path) -> None:
    """Give the anonymous file `fd` the name `path` (replacing it) through a uniquely named sibling."""
    tmp = path.parent / f".{path.name}{_TMP}.{os.getpid()}.{time.monotonic_ns()}"
    linkat = _libc().linkat  # os.link does not follow the /proc/self/fd link
    linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    if linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(tmp), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(tmp))
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_chunks(fd: int, chunks: Iterable[bytes | memoryview]) -> None:
    with os.fdopen(fd, "wb", closefd=False) as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(fd)


def write_bytes_chunks(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> Path:
    """Write `chunks` to `path` atomically (parents created); returns the absolute path."""
    path = Path(path).expanduser().absolute()
    with naming_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)  # mode & ~umask, like open()
        except (AttributeError, OSError):  # no O_TMPFILE here: a hidden sibling, left behind only by kill -9
            fd = None
        if fd is not None:
            try:
                _write_chunks(fd, chunks)
                _commit_point()
                _link_into_place(fd, path)
            finally:
                os.close(fd)
            return path
        return _write_via_sibling(path, chunks)


def _write_via_sibling(path: Path, chunks: Iterable[bytes | memoryview]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        _write_chunks(fd, chunks)
        _commit_point()
        os.replace(tmp, path)
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_chunks(path, [text.encode("utf-8")])


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, not ASCII-escaped), atomically."""
    return write_bytes_chunks(path, ((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records))


def write_report(out_dir: str | os.PathLike, name: str, text: str, data, plot: Callable | None = None) -> None:
    """OUT_DIR/NAME.md (`text`), NAME.json (`data`) and, with `plot(data, file)`, NAME.png; each atomically."""
    out = Path(out_dir)
    write_text(out / f"{name}.md", text)
    write_text(out / f"{name}.json", json.dumps(data, indent=1))
    if plot is not None:
        png = io.BytesIO()
        plot(data, png)
        write_bytes_chunks(out / f"{name}.png", [png.getvalue()])


# ----------------------------------------------------------------------------- the output-safety rule


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they lead
        return a.resolve() == b.resolve()


def check_output(
    path: str | os.PathLike | None, what: str, inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()
) -> Path:
    """`path` (absolute) unless it is empty, the working directory or above it, or one of `inputs`
    ((flag, path) pairs, None paths skipped); else ValueError naming `what`."""
    if path is None or not str(path).strip():
        raise ValueError(f"{what} is empty: give a path")
    p = Path(path).expanduser().absolute()
    cwd = Path.cwd().resolve()
    if cwd == p.resolve() or p.resolve() in cwd.parents:
        where = "the current directory" if cwd == p.resolve() else f"a directory holding the current one ({cwd})"
        raise ValueError(f"{what} {str(path)!r} is {where}: name a path of its own")
    for flag, source in inputs:
        if source is not None and str(source).strip() and _same_file(p, Path(source).expanduser().absolute()):
            raise ValueError(
                f"{what} {p} is the input {flag} {source}: writing it would destroy the input; choose another path"
            )
    return p


def claim_run_dir(path: str | os.PathLike, what: str = "run.dir") -> Path:
    """Create (or accept) the training run directory `path` and mark it RUN_MARKER; ValueError when it is a
    folder anjax did not create (non-empty without the marker nor a run's model_config.json + checkpoints/)."""
    p = check_output(path, what)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p}: exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not (p / RUN_MARKER).is_file():
        if not ((p / "model_config.json").is_file() and (p / "checkpoints").is_dir()):
            raise ValueError(
                f"{what} {p} holds files anjax did not write (no {RUN_MARKER}): choose a new or empty run directory"
            )
    p.mkdir(parents=True, exist_ok=True)
    if not (p / RUN_MARKER).is_file():
        write_text(p / RUN_MARKER, "a training run directory made by anjax (train.py)\n")
    return p


# ----------------------------------------------------------------------------- directories


def written_by_anjax(path: Path) -> bool:
    """`path` is empty, or holds MARKER and only the files it lists."""
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    try:
        listed = set(json.loads((path / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return names <= listed | {MARKER}


def check_replaceable(path: str | os.PathLike, force: bool = False, what: str = "output directory") -> Path:
    """The absolute `path` when `replace_dir` may put a new directory there, else ValueError saying why."""
    path = check_output(path, what)
    if not path.exists() and not path.is_symlink():
        return path
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path} exists and is not a directory: choose another output path")
    if not force and not written_by_anjax(path):
        raise ValueError(
            f"{path} exists and holds files anjax did not write (no {MARKER} listing them): "
            "choose another output directory, or pass --force to move it aside to "
            f"{path.name}.replaced-<time> (nothing is deleted)"
        )
    return path


def make_temp_dir(target: str | os.PathLike) -> Path:
    """A hidden sibling of `target` to build it in, with mode 0777 & ~umask (parents created)."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{_TMP}.*"):  # left by a run killed -9
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP}.{os.getpid()}.", dir=target.parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False when the system cannot."""
    try:
        renameat2 = _libc().renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, target: str | os.PathLike, files: Iterable[str], force: bool = False) -> Path | None:
    """Put the finished directory `tmp` (listing `files` in its MARKER) at `target`.

    Returns where a non-anjax directory was moved with `force`, else None.
    """
    target = check_replaceable(target, force)
    mask = umask()
    for p in tmp.rglob("*"):  # some writers (safetensors) make 0600 files
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    write_text(tmp / MARKER, json.dumps({"files": sorted(files)}, indent=1) + "\n")
    _commit_point()
    if not target.exists():
        os.rename(tmp, target)
        return None
    moved = None
    if not written_by_anjax(target):  # force: keep the user's directory, under a new name
        moved = target.with_name(f"{target.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(target, moved)
        os.rename(tmp, target)
        return moved
    if _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the previous export
        return None
    aside = target.with_name(f".{target.name}{_TMP}.{os.getpid()}.old")
    os.rename(target, aside)
    os.rename(tmp, target)
    shutil.rmtree(aside)
    return moved
