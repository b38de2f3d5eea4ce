"""Model files sent with RepositoryModelLoad (Triton's `file:<path>` parameters), written into the model's folder.

Each path is relative to the model's folder (`1/model.onnx`, `warmup/seven`): no absolute path, no `..`,
no hidden or empty part, and it must resolve inside the folder (a symlink pointing out is refused). The
files of one request together stay under the server's limit. Writing keeps what it replaced, so a load
that fails puts the folder back as it was (a folder the request created is removed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from libs.errors import InvalidArgument

MAX_PATH_PARTS = 4
MAX_FILES = 32


def check_model_files(files: Mapping[str, bytes], max_bytes: int) -> None:
    """Refuses paths that could leave the model's folder and requests above the size limit.

    Raises:
        InvalidArgument: Names the parameter and the rule it breaks.
    """
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"'file:' parameters: {len(files)} files, at most {MAX_FILES}")
    for path in files:
        parts = path.split("/")
        if len(parts) > MAX_PATH_PARTS or not all(_plain(part) for part in parts):
            raise InvalidArgument(
                f"parameter 'file:{path}': the path must be relative to the model's folder, with at most "
                f"{MAX_PATH_PARTS} parts, none empty, hidden, '..' or holding '\\\\'"
            )
    total = sum(len(data) for data in files.values())
    if total > max_bytes:
        raise InvalidArgument(f"'file:' parameters: {total} bytes in all, at most {max_bytes}")


def _plain(part: str) -> bool:
    return bool(part) and not part.startswith(".") and not any(c in part for c in "\\\0:")


def write_model_files(model_dir: Path, files: Mapping[str, bytes]) -> Callable[[], None]:
    """Writes `files` under `model_dir` (checked with check_model_files first); returns the undo.

    Raises:
        InvalidArgument: A path resolves outside the folder (a symlink); nothing is left written.
    """
    created: list[Path] = []  # folders this call made, outermost first
    replaced: list[tuple[Path, bytes | None]] = []

    def undo() -> None:
        for target, previous in reversed(replaced):
            if previous is None:
                target.unlink(missing_ok=True)
            else:
                target.write_bytes(previous)
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)

    try:
        if not model_dir.exists():
            model_dir.mkdir()
            created.append(model_dir)
        root = model_dir.resolve()
        for path, data in files.items():
            target = model_dir / path
            for parent in reversed(target.relative_to(model_dir).parents[:-1]):
                folder = model_dir / parent
                if not folder.exists():
                    folder.mkdir()
                    created.append(folder)
            if not target.resolve().is_relative_to(root) or target.is_dir():
                raise InvalidArgument(
                    f"parameter 'file:{path}': does not name a file inside the model's folder"
                )
            previous = target.read_bytes() if target.is_file() else None
            replaced.append((target, previous))
            staging = target.with_name(f".{target.name}.partial")
            staging.write_bytes(data)
            os.replace(staging, target)
    except BaseException:
        undo()
        raise
    return undo
