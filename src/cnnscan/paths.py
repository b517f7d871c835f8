"""Why a path cannot be read as a file, in words: the operating system's reason (a missing
file, a symbolic link loop, a broken link, a folder, no permission) instead of one "no such
file" for all of them."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def file_problem(path: Path, kind: str) -> str | None:
    """None if `path` is a regular file; else one line saying what is wrong with it as a
    `kind` file ("image", "model", "weights")."""
    try:
        info = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (
                f"{path} is a symbolic link loop (its links never reach a file); point it "
                f"at the {kind} file"
            )
        if e.errno == errno.EACCES:
            return f"permission denied: cannot open {path} (the {kind} file or its folder)"
        if e.errno == errno.ENAMETOOLONG:
            return f"the {kind} file name is too long: {str(path)[:80]}…"
        if path.is_symlink():
            target = os.readlink(path)
            return f"{path} is a broken symbolic link: its target {target} does not exist"
        return f"no such {kind} file: {path}"
    if stat.S_ISDIR(info.st_mode):
        return f"{path} is a folder, not a {kind} file"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (a device, pipe or socket), not a {kind} file"
    return None
