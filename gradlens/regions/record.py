"""An area-curve run's outputs as one unit: written together, recorded last, checked when read back.

``gradlens area-curve --name N`` writes Figure A2 (``N.png``, ``N.pdf``) and its
companion (``N_mass_area.png``/``.pdf``), their tables (``N.csv``/``.parquet``,
``N_paired``, the metrics and their summary, ``N_per_image.parquet``,
``N_concentration``, ``N_decomposition``, ``N_mass_area``) and the record
``N.json`` that says which settings made them and what the verdicts are. Everything is first written into a private staging folder inside
the work directory — the figures first, so a figure that cannot be drawn
leaves every file of the previous run as it was — then moved into place, and
the record is written last, atomically, listing the SHA-256 of every file it
describes. A run killed while moving leaves the previous record beside some
new files: :func:`load_area_curve_record` sees that the files are not the ones
the record lists and refuses in one sentence, so the report never describes
new tables with old settings.

A record is a file anyone can edit or send, so it is type-checked like a
manifest (:mod:`gradlens.selection.manifest`): a list where an object belongs,
a string where a number belongs, a file name that leaves the work directory,
each gives one sentence naming the file and the field.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import shutil
import socket
import tempfile
from numbers import Integral, Real
from pathlib import Path
from typing import Iterator

import pandas as pd

from gradlens.errors import GradlensError, InputFileError, OutputError
from gradlens.fileio import check_output_name, read_json, read_table_file, sha256_file, short_repr

RECORD_WHAT = "area-curve record"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,250}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ROLE = re.compile(r"a|b\d*")


def again(name: str, command: str = "area-curve") -> str:
    default = command.replace("-", "_")
    return f"run 'gradlens {command}" + ("" if name == default else f" --name {name}") + "' again"


# -- writing as one unit -------------------------------------------------------------------------------

RESERVED_NAMES = ("manifest", "selection", "metrics", "metrics_summary")  # the work directory's own files


def record_command(record) -> str | None:
    """Which command wrote a record: its ``command`` field, or area-curve for records written before it had one."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("command"), str):
        return record["command"]
    settings = record.get("settings")
    if "decomposition" in record or (isinstance(settings, dict) and "thresholds" in settings):
        return "area-curve"
    return "faithfulness" if "sentences" in record and "flags" in record else None


DEFAULT_NAMES = {"area-curve": "area_curve", "faithfulness": "faithfulness"}  # each command's default --name
OUTPUT_PARTS = {  # the <name>_<part> stems each command writes beside <name>.*
    "area-curve": ("metrics", "concentration", "mass_area", "decomposition", "paired", "per_image"),
    "faithfulness": ("curves", "areas", "paired", "randomisation", "randomisation_summary"),
}


def output_stems(name: str, command: str) -> set[str]:
    """The file stems a run of ``command`` under ``name`` writes (each with one or more suffixes)."""
    return {name} | {f"{name}_{part}" for part in OUTPUT_PARTS[command]}


def check_name_is_free(workdir: str | os.PathLike, name: str, command: str) -> None:
    """``--name`` must not overwrite the work directory's own files or another command's outputs (one sentence).

    A name is refused when one of the files it would write is also a file of a default run (of either command),
    so ``area_curve_normalized`` is free but ``area_curve_paired`` (the default run's paired table) is not."""
    check_output_name(name)
    if name in RESERVED_NAMES or any(name.startswith(f"{reserved}_") for reserved in RESERVED_NAMES):
        raise GradlensError(f"--name {name} would overwrite the work directory's own {name} files; choose another name.")
    mine = output_stems(name, command)
    for other, default in DEFAULT_NAMES.items():
        if name != DEFAULT_NAMES[command] and mine & output_stems(default, other):
            shared = sorted(mine & output_stems(default, other))[0]
            raise GradlensError(f"--name {name} would share {shared}.* with the default run of 'gradlens {other}'; "
                                "choose another name.")
    path = Path(workdir) / f"{name}.json"
    if path.is_file():
        try:
            other = record_command(read_json(path, "record"))
        except GradlensError:
            other = None
        if other != command:
            raise GradlensError(f"--name {name} would overwrite {path}, which {other or 'another command'} wrote; "
                                "choose another name.")



def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_staging(workdir: Path, name: str) -> int:
    """Remove the staging folders of ``name`` that a killed run of this machine left behind (its process is
    gone); a folder of a live run, or of another machine sharing the work directory, is left alone."""
    host = socket.gethostname()
    removed = 0
    for folder in workdir.glob(f".{glob.escape(name)}.*.partial"):
        rest = folder.name[len(name) + 2:-len(".partial")]  # "<host>-<pid>.<random>" (host names may hold dots)
        owner_host, _, pid = rest.rpartition(".")[0].rpartition("-")
        if owner_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


@contextlib.contextmanager
def staging_folder(workdir: str | os.PathLike, name: str) -> Iterator[Path]:
    """A private folder inside ``workdir`` (same file system: moving out of it is a rename), removed afterwards.

    Its name says which process made it (``.<name>.<host>-<pid>.<random>.partial``), so the folder a killed run
    could not remove is removed by the next run of the same output on the same machine."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(workdir, name)
        folder = Path(tempfile.mkdtemp(prefix=f".{name}.{socket.gethostname()}-{os.getpid()}.", suffix=".partial",
                                       dir=workdir))
    except OSError as exc:
        raise OutputError(f"Cannot write into {workdir}: {exc.strerror or exc}.") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _files_of_other_records(workdir: Path, name: str) -> dict[str, str]:
    """file -> record name, for every file another command's (or another name's) record in ``workdir`` lists."""
    owned = {}
    for path in workdir.glob("*.json"):
        if path.stem == name or path.stem in RESERVED_NAMES:
            continue
        try:
            record = read_json(path, "record")
        except GradlensError:
            continue
        if record_command(record) is None or not isinstance(record.get("sha256"), dict):
            continue
        owned.update({str(file): path.name for file in record["sha256"]})
    return owned


def move_into_place(staged: Path, workdir: str | os.PathLike, name: str | None = None) -> dict[str, str]:
    """Move every file of ``staged`` into ``workdir`` (each an atomic rename); returns name -> SHA-256 of each,
    for the record written after them.

    Checked before anything moves, so a refusal leaves the previous outputs whole: no file may replace one that
    another record (``name`` is this run's own) lists, nor a folder or other non-file of the same name."""
    workdir = Path(workdir)
    files = sorted(p for p in staged.iterdir() if p.is_file() and not p.name.startswith("."))
    owned = _files_of_other_records(workdir, name) if name is not None else {}
    for p in files:
        target = workdir / p.name
        if p.name in owned:
            raise OutputError(f"Writing {target} would overwrite an output of {workdir / owned[p.name]}; "
                              "choose another --name.")
        if (target.exists() or target.is_symlink()) and not (target.is_file() and not target.is_symlink()):
            raise OutputError(f"Cannot write {target}: something other than a file has that name.")
    digests = {p.name: sha256_file(p) for p in files}
    for p in files:
        try:
            os.replace(p, workdir / p.name)
        except OSError as exc:
            raise OutputError(f"Cannot write {workdir / p.name}: {exc.strerror or exc}.") from None
    return digests


# -- reading back ----------------------------------------------------------------------------------------


def load_area_curve_record(workdir: str | os.PathLike, name: str = "area_curve", missing_ok: bool = False) -> dict:
    """``<workdir>/<name>.json`` checked field by field, and the files it lists checked to be the ones it was
    written with; one sentence otherwise. With ``missing_ok`` a work directory without the record gives ``{}``."""
    path, record = read_record(workdir, name, "area-curve", RECORD_WHAT, missing_ok)
    if path is None:
        return {}
    check_area_curve_record(record, path, name)
    check_record_files(record, Path(workdir), path, name)
    return record


def read_record(workdir: str | os.PathLike, name: str, command: str, what: str, missing_ok: bool = False):
    """``(path, parsed JSON)`` of ``<workdir>/<name>.json`` as written by ``command`` (not yet checked); ``(None,
    None)`` when absent and ``missing_ok``, else one sentence saying to run the command."""
    check_output_name(name)  # the rule the commands write by: the record and its tables stay inside the work directory
    workdir = Path(workdir)
    path = workdir / f"{name}.json"
    if not path.is_file():
        if missing_ok:
            return None, None
        raise GradlensError(f"{workdir} has no {name}.json; run 'gradlens {command} --workdir {workdir}' first.")
    return path, read_json(path, what)


def record_table(workdir: str | os.PathLike, record: dict, file: str) -> pd.DataFrame:
    """A table a (checked) record lists: its exact Parquet twin when the record hashes that too, else exactly the
    listed file; never a file the record does not vouch for (an edited twin whose hash was removed is not read)."""
    workdir = Path(workdir)
    twin = f"{Path(file).stem}.parquet"
    digests = record.get("sha256") if isinstance(record.get("sha256"), dict) else {}
    return read_table_file(workdir / (twin if twin in digests else file))


def check_record_files(record: dict, workdir: Path, path: Path, name: str = "area_curve",
                       command: str = "area-curve") -> None:
    """The files the record lists are the ones it was written with (by SHA-256; a record without them is refused
    by its own check first). ``command`` wrote them (named in the remedy)."""
    digests = record.get("sha256")
    if not isinstance(digests, dict):
        raise InputFileError(f"{path} lists no SHA-256 of its outputs; {again(name, command)}.")
    for file, digest in digests.items():
        target = workdir / file
        if not target.is_file():
            raise InputFileError(f"The outputs of {path} are incomplete ({file} is missing); {again(name, command)}.")
        try:
            mine = sha256_file(target)
        except OSError as exc:
            raise InputFileError(f"Cannot read {target}: {exc.strerror or exc}.") from None
        if mine != digest:
            raise InputFileError(f"The tables and figures beside {path} do not match it ({file} was written by "
                                 f"another run or changed since); {again(name, command)}.")


def _objects(record: dict, field: str, refuse) -> list[dict]:
    """``record[field]``: a list (empty when absent) whose every item is an object, or ``refuse``'s sentence."""
    items = record.get(field, [])
    if not isinstance(items, list):
        refuse(field, items, "a list")
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            refuse(f"{field}[{k}]", item, "an object")
    return items

def check_area_curve_record(record, path: Path, name: str = "area_curve") -> None:
    """Every field a reader uses, type-checked once (the style of the manifest's checks)."""
    redo = again(name)

    def refuse(field: str, value, expected: str):
        raise InputFileError(f"{path} records {field} {short_repr(value)}, which is not {expected}; {redo}.")

    if not isinstance(record, dict):
        raise InputFileError(f"{path} is not an area-curve record (not a JSON object); {redo}.")
    for field in ("gradlens_version", "created"):
        if record.get(field) is not None and not isinstance(record[field], str):
            refuse(field, record[field], "text")
    for field in ("settings", "outputs"):
        if not isinstance(record.get(field), dict):
            refuse(field, record.get(field), "an object")
    _check_settings(record["settings"], refuse)
    check_outputs(record["outputs"], refuse)
    for k, model in enumerate(_objects(record, "models", refuse)):
        if not (isinstance(model.get("role"), str) and _ROLE.fullmatch(model["role"])):
            refuse(f"models[{k}].role", model.get("role"), "a role (a, b, b1, b2...)")
        for field in ("label", "checkpoint", "maps"):
            if model.get(field) is not None and not isinstance(model[field], str):
                refuse(f"models[{k}].{field}", model[field], "text")
        for field in ("computed", "reused"):
            if model.get(field) is not None and not is_integer(model[field], 0):
                refuse(f"models[{k}].{field}", model[field], "a non-negative integer")
    for k, row in enumerate(_objects(record, "summary", refuse)):
        for field, value in row.items():
            if value is not None and not isinstance(value, (str, int, float)):
                refuse(f"summary[{k}].{field}", value, "text or a number")
    _check_decomposition(record, refuse)
    # Every output is covered by its hash: a record without hashes (written before gradlens listed them, or edited
    # to drop them) would make the report trust any table beside it. Rerunning area-curve reuses every map.
    check_output_hashes(record, refuse)


def check_output_hashes(record: dict, refuse) -> None:
    """A record's ``sha256``: a plain file name and a SHA-256 digest for every file its (checked) ``outputs``
    name. ``refuse(field, value, expected)`` says what is wrong in the caller's words."""
    digests = record.get("sha256")
    if not isinstance(digests, dict):
        refuse("sha256", digests, "the SHA-256 of every output (records written before gradlens hashed them have none)")
    for file, digest in digests.items():
        if not _plain_name(file):
            refuse("sha256", file, "a file name inside the work directory")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            refuse(f"sha256.{file}", digest, "a SHA-256 digest")
    listed = [f for key, f in record["outputs"].items() if key != "figure"] + list(record["outputs"].get("figure", []))
    unhashed = [f for f in listed if f not in digests]
    if unhashed:
        refuse("outputs", unhashed[0], "a file listed under sha256")


def _check_decomposition(record: dict, refuse) -> None:
    """The scale/focus entry (absent in records written before gradlens made one): its grid and verdicts."""
    entry = record.get("decomposition")
    if entry is None:
        return
    if not isinstance(entry, dict):
        refuse("decomposition", entry, "an object")
    if "log_threshold_low" in entry and not is_number(entry["log_threshold_low"]):
        refuse("decomposition.log_threshold_low", entry["log_threshold_low"], "a finite number")
    if "log_threshold_width" in entry and not (is_number(entry["log_threshold_width"]) and entry["log_threshold_width"] > 0):
        refuse("decomposition.log_threshold_width", entry["log_threshold_width"], "a positive number")
    if "scale" in entry and not isinstance(entry["scale"], str):
        refuse("decomposition.scale", entry["scale"], "text")
    for k, verdict in enumerate(_objects(entry, "verdicts", lambda f, v, e: refuse(f"decomposition.{f}", v, e))):
        if not (isinstance(verdict.get("role"), str) and _ROLE.fullmatch(verdict["role"])):
            refuse(f"decomposition.verdicts[{k}].role", verdict.get("role"), "a role (a, b, b1, b2...)")
        if not (isinstance(verdict.get("versus"), str) and _ROLE.fullmatch(verdict["versus"])):
            refuse(f"decomposition.verdicts[{k}].versus", verdict.get("versus"), "a role (a, b, b1, b2...)")
        for field in ("label", "versus_label", "sentence"):
            if not isinstance(verdict.get(field), str):
                refuse(f"decomposition.verdicts[{k}].{field}", verdict.get(field), "text")


def is_integer(value, least: int | None = None, most: int | None = None) -> bool:
    """A JSON integer (not a boolean) within the bounds given: what a record's count or seed must be."""
    return (isinstance(value, Integral) and not isinstance(value, bool)
            and (least is None or value >= least) and (most is None or value <= most))


def is_number(value) -> bool:
    """A finite JSON number (not a boolean): what a record's level or threshold must be."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain_name(value) -> bool:
    return isinstance(value, str) and bool(_PLAIN_NAME.fullmatch(value)) and ".." not in value


def statistics_rules() -> dict:
    """The rules of the settings every statistics-writing record shares (images, bootstrap, seed, level):
    field -> (test of a present value, what it must be)."""
    from gradlens.regions.statistics import MAX_SEED

    return {
        "num_images": (lambda v: is_integer(v, 1), "a positive integer"),
        "bootstrap": (lambda v: is_integer(v, 0), "a non-negative integer"),
        "bootstrap_seed": (lambda v: is_integer(v, 0, MAX_SEED), "an integer from 0 to 2**63 - 1"),
        "confidence_level": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    }


def check_setting_fields(settings: dict, rules: dict, refuse) -> None:
    """Each present field of a record's ``settings`` checked by its rule; ``refuse`` says the first bad one."""
    for field, (test, expected) in rules.items():
        if field in settings and not test(settings[field]):
            refuse(f"settings.{field}", settings[field], expected)


def _check_settings(settings: dict, refuse) -> None:
    from gradlens.attribution.store import MAP_DTYPES
    from gradlens.regions.area import MAX_THRESHOLDS

    rules = {  # field: (test of a present value, what it must be); None is allowed only where said
        "thresholds": (lambda v: is_integer(v, 2, MAX_THRESHOLDS), f"an integer from 2 to {MAX_THRESHOLDS:,}"),
        "scale": (lambda v: v in ("linear", "log"), "linear or log"),
        "log_decades": (lambda v: v is None or (is_number(v) and v > 0), "a positive number"),
        "per_image_normalize": (lambda v: isinstance(v, bool), "true or false"),
        "from_summaries": (lambda v: isinstance(v, bool), "true or false"),
        "t_max_percentile": (lambda v: is_number(v) and 0 < v <= 100, "a percentile in (0, 100]"),
        "map_dtype": (lambda v: v in MAP_DTYPES, "float16 or float32"),
        "batch_size": (lambda v: v is None or is_integer(v, 1), "a positive integer"),
        "threshold_max": (lambda v: is_number(v) and v > 0, "a positive number"),
        **statistics_rules(),
    }
    check_setting_fields(settings, rules, refuse)
    attribution = settings.get("attribution", {})
    if not isinstance(attribution, dict):
        refuse("settings.attribution", attribution, "an object")
    _check_attribution(attribution, refuse)


def _check_attribution(attribution: dict, refuse) -> None:
    from gradlens.attribution.methods import AttributionConfig

    kinds = {"method": str, "channel_reduce": str, "baseline": str, "precision": str, "target": str,
             "steps": int, "samples": int, "seed": int, "noise": float}
    known = {}
    for field, value in attribution.items():
        kind = kinds.get(field)
        if kind is None:
            continue  # a setting of another gradlens version: not read
        fits = isinstance(value, str) if kind is str else is_integer(value) if kind is int else is_number(value)
        if not fits:
            refuse(f"settings.attribution.{field}", value, {str: "text", int: "an integer", float: "a finite number"}[kind])
        known[field] = value
    try:
        AttributionConfig(**known).check()
    except GradlensError as exc:
        refuse("settings.attribution", attribution, f"settings gradlens accepts ({str(exc).rstrip('.')})")


def check_outputs(outputs: dict, refuse) -> None:
    """A record's ``outputs``: plain file names inside the work directory, the figures as a list of them."""
    for key, value in outputs.items():
        if key == "figure":
            if not isinstance(value, list):
                refuse("outputs.figure", value, "a list of file names")
            for k, file in enumerate(value):
                if not _plain_name(file):
                    refuse(f"outputs.figure[{k}]", file, "a file name inside the work directory")
        elif not _plain_name(value):
            refuse(f"outputs.{key}", value, "a file name inside the work directory")
