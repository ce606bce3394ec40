"""NetCDF writing that never leaves a half-written file.

:func:`atomic_to_netcdf` writes a Dataset to a temporary file in the destination
folder and renames it into place only when the write succeeded.

**Permissions.** ``tempfile.mkstemp`` creates its file with mode ``0600`` whatever the
umask, and ``os.replace`` keeps that mode, so the temporary file is given, before the
rename, the mode the destination would get from a plain ``open(path, "w")``:

* a new destination: ``0666 & ~umask`` (like every other file the package writes,
  e.g. the PNG maps);
* an existing regular file: its current permission bits, so that replacing a file
  the user made group-writable or private keeps it that way (as a text editor that
  saves atomically does). Ownership is not copied (that needs privileges).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from pathlib import Path

from ..exceptions import InputError


#: Mode requested by ``open``/``creat`` for a new file, before the umask.
DEFAULT_FILE_MODE = 0o666

# os.umask can only be read by setting it; the lock keeps two threads of this module
# from interleaving a set/restore pair (other code can still race, see _current_umask).
_UMASK_LOCK = threading.Lock()


def _current_umask():
    """The process umask, read without changing it where the platform allows.

    Linux reports it in ``/proc/self/status`` (kernel 4.7 and later). Elsewhere the
    only way is ``os.umask``, which sets a new value and returns the old: the value
    set for that instant is the restrictive ``0o077``, so a file created by another
    thread in that window is at worst private, never world-writable.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def _final_mode(path):
    """Permission bits the file at ``path`` should end with (see the module docstring)."""
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISREG(existing.st_mode):
        return stat.S_IMODE(existing.st_mode)
    return DEFAULT_FILE_MODE & ~_current_umask()


def _remove_stale_temporaries(folder, name):
    """Remove temporaries of ``name`` left by writers that were killed (SIGKILL, power loss).

    A temporary is named ``.NAME.PID.XXXXXXXX.tmp`` after the process writing it; one
    whose process no longer exists on this machine can only be the remains of a killed
    write. Temporaries of live processes (a concurrent writer) are left alone, and so
    are those of other destinations, including names that extend ``name`` (the
    temporaries of ``NAME.1`` start with ``.NAME.1.`` too).
    """
    # the random part of mkstemp's names has no dot: anything else is another file
    own = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[^.]+\.tmp")
    for entry in os.listdir(folder):
        match = own.fullmatch(entry)
        pid = None if match is None else int(match.group(1))
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass  # removed by another writer meanwhile, or not ours to remove
        except (PermissionError, OSError):
            continue  # the process exists (or cannot be asked): keep its file


def atomic_to_netcdf(dataset, path, **kwargs):
    """Write ``dataset`` to ``path`` atomically.

    The file is written next to the destination under a hidden temporary name,
    ``.NAME.PID.XXXXXXXX.tmp`` (``PID`` the id of the writing process), and renamed over
    ``path`` (``os.replace``) only after a complete write, so an exception or an
    interruption (Ctrl-C) leaves no partial file, removes its temporary and never
    clobbers an existing file. The written file gets the mode a normally created file
    would get: ``0666 & ~umask``, or the permission bits of the file it replaces.

    **A writer killed outright** (SIGKILL, the out-of-memory killer, a power cut)
    cannot clean up. The previous file at ``path`` is then intact, and the killed
    writer's temporary stays next to it until the next call of this function for the
    same ``path``, which first removes every temporary of ``path`` whose process no
    longer runs on this machine. Temporaries of live processes (a concurrent writer)
    and of other destinations in the folder are left alone; reading the file (e.g.
    :func:`xadapter.load`) removes nothing. Processes are looked up on this machine
    only: on a folder shared between machines, do not write the same path from two
    machines at once (a writer elsewhere could have its temporary taken for a dead
    one's).

    Parameters
    ----------
    dataset : xarray.Dataset
    path : str or os.PathLike
    **kwargs
        Passed to :meth:`xarray.Dataset.to_netcdf` (e.g. ``encoding``).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist.")
    _remove_stale_temporaries(folder, path.name)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        dataset.to_netcdf(temporary, **kwargs)
        # after the write: the NetCDF library may recreate the file it is given
        os.chmod(temporary, _final_mode(path))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
