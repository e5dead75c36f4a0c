"""Folders written atomically: a reader sees the old folder or the new one, never a half-written one."""
import shutil
import tempfile
from pathlib import Path


def write_dir_atomically(final: Path, write) -> Path:
    """Call write(tmp_folder) on a temporary folder beside `final`, then rename it to `final`. An
    older `final` is moved aside first and removed only after the new one is in place; if `write`
    fails, the temporary folder is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
