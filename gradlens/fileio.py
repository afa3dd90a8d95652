"""Small file helpers shared by every step: atomic writes, content hashes, JSON reading.

Writes go to a temporary file in the same folder and are renamed into place,
so a killed run never leaves a half-written table that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from gradlens.errors import InputFileError, OutputError


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, which races with other threads
    creating files; Linux reports it in ``/proc/self/status``.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions a plain ``open()`` would give it (``0o666``
    less the umask), not ``mkstemp``'s private ``0o600``, so outputs stay
    readable by whoever could read the folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:  # no space, no permission...: name the user's file, not the temporary one
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output_name(name: str) -> str:
    """An area-curve run's name (``--name``) is a plain file stem inside the work directory: the same rule for
    the command that writes ``<name>.json`` and its tables and for every command that reads them back."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name) or ".." in name:
        from gradlens.errors import GradlensError

        raise GradlensError(f"The output name {short_repr(name)} must be a plain file stem such as area_curve "
                            "(letters, digits, '_', '-', '.'; no folder).")
    return name


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_table(df: pd.DataFrame, directory: str | os.PathLike, stem: str) -> None:
    """Write ``stem.csv`` and ``stem.parquet``: CSV for people and spreadsheets, Parquet for exact types."""
    directory = Path(directory)
    with atomic_path(directory / f"{stem}.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(directory / f"{stem}.parquet") as tmp:
        df.to_parquet(tmp, index=False)


def read_table(directory: str | os.PathLike, stem: str) -> pd.DataFrame:
    """Read a table written by :func:`write_table`, preferring the exact Parquet copy."""
    directory = Path(directory)
    parquet, csv = directory / f"{stem}.parquet", directory / f"{stem}.csv"
    try:
        if parquet.is_file():
            return pd.read_parquet(parquet)
        if csv.is_file():
            return pd.read_csv(csv)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise InputFileError(f"Cannot read table '{stem}' in {directory}: {exc}.") from exc
    raise InputFileError(f"{directory} has no {stem}.parquet or {stem}.csv.")


def read_table_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read exactly the named ``.csv`` or ``.parquet`` file (an edited CSV is not shadowed by its Parquet twin)."""
    path = Path(path)
    require_file(path, "table")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise InputFileError(f"Cannot read the table {path} ({type(exc).__name__}).") from None


def image_id_column(table: pd.DataFrame, where) -> list[int]:
    """A table's ``image_id`` column as Python ints, or one sentence naming the first value that is not one."""
    ids = []
    for value in table["image_id"]:
        if isinstance(value, str):
            value = value.strip()
        try:
            number = int(value)
            if float(value) != number:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise InputFileError(f"{where} has an image_id {short_repr(value)} that is not an integer.") from None
        ids.append(number)
    return ids


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Content hash that identifies an input independently of its path or modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path if it is a readable file, else raise a one-sentence error."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"The {what} {path} does not exist.")
    if not path.is_file():
        raise InputFileError(f"The {what} {path} is not a file.")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"The {what} {path} is not readable.")
    return path


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a file the user named; missing, unreadable or empty files are one-sentence errors."""
    path = require_file(path, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise InputFileError(f"Cannot read the {what} {path}: {exc.strerror}.") from exc
    if not data.strip():
        raise InputFileError(f"The {what} {path} is empty.")
    return data


def parse_json(data: bytes, path: str | os.PathLike, what: str) -> Any:
    """Parse JSON text, turning every failure into one sentence naming the file and the position."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"The {what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(f"The {what} {path} is not UTF-8 JSON text.") from exc
    except RecursionError:
        raise InputFileError(f"The {what} {path} is nested too deeply to be read as JSON.") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputFileError(f"The {what} {path} cannot be read as JSON ({exc}).") from exc


def short_repr(value, limit: int = 60) -> str:
    """``repr`` cut to a readable length, so a huge value cannot flood a one-sentence error."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # a table's cell reads 'nan' or '1.5', not 'np.float64(nan)'
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer past Python's digit limit, deep nesting
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read and parse a JSON file with one-sentence errors."""
    return parse_json(read_bytes(path, what), path, what)
