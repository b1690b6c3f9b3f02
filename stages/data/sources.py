"""Read the rows of each ``--data`` source, in order, as plain Python dicts; validating them is ``rows.py``'s job.

Accepted sources (each ``--data`` value):

- files: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a JSON list of rows, or JSON lines), ``.json.gz``, ``.parquet``;
- a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict: the split ``--data-split``);
- a Hugging Face dataset: a Hub id ``owner/name[@config][:split]`` or a dataset repo laid out in a local folder,
  read with ``datasets.load_dataset`` (so a Hub id works offline from the local HF cache, ``HF_HUB_OFFLINE=1``).
  ``:split`` after a folder or id overrides ``--data-split`` (default ``train``).

Rows arrive as the same Python dicts whatever the source, so content ids do not depend on it. ``check_paths`` resolves
every value up front (a missing file fails before the others are read); ``read_rows`` yields (row number, row) with
the row number 1-based (the line number for JSON lines). Unreadable files, bad JSON or UTF-8 and datasets that cannot
be loaded raise ``UserError`` with one line naming the source.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.base.constants import DEFAULT_SPLIT  # declared once, there
from stages.base.errors import UserError

SUPPORTED = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict / Dataset)
OTHER_FILE_TYPES = (".csv", ".tsv", ".txt", ".arrow", ".xlsx", ".gz", ".zip", ".yaml", ".yml")  # not Hub ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # name or owner/name


@dataclass(frozen=True)
class Source:
    """One --data value, resolved: a file, a save_to_disk folder, or a `datasets.load_dataset` target."""

    kind: str  # "file" | "saved" | "hub" (a Hub id, or a dataset repo in a local folder)
    path: str  # the file or folder, or the Hub id, without @config / :split
    source: str  # how errors and reports name it: as given, plus ":split" where a split was chosen
    split: str = DEFAULT_SPLIT
    config: str | None = None


# ----------------------------------------------------------------------------------------------- resolving


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    # longest suffix first: ".jsonl.gz" must not be taken for ".gz"
    for suffix in sorted(SUPPORTED, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def check_paths(paths: Sequence[str | Path], split: str = DEFAULT_SPLIT) -> list[Source]:
    """Every --data value resolved to a source that exists (files) or may be loaded (datasets)."""
    if isinstance(paths, (str, Path)):  # a lone path is an easy mistake; accept it
        paths = [paths]
    if not paths:
        raise UserError("no data files given; pass .jsonl, .jsonl.gz, .json or .parquet files, a save_to_disk "
                        "folder or a Hub dataset id")
    return [_resolve(p, split) for p in paths]


def _resolve(given: str | Path, split: str) -> Source:
    path, source = Path(given), str(given)
    if _file_kind(path) is not None:
        if not path.exists():
            raise UserError(f"{source}: no such file; check the path")
        if not path.is_file():
            raise UserError(f"{source}: not a regular file; pass the data files themselves, not a folder")
        return Source("file", source, source)
    if path.is_file() or path.suffix.lower() in OTHER_FILE_TYPES:
        raise UserError(f"{source}: unsupported file type; use one of {', '.join(SUPPORTED)}, a save_to_disk "
                        "folder or a Hub dataset id")
    base, config, own_split = _split_spec(source)
    if Path(base).is_dir():
        saved = any((Path(base) / m).is_file() for m in SAVED_MARKERS)
        single = saved and not (Path(base) / SAVED_MARKERS[0]).is_file()  # a Dataset: no splits to choose
        label = source if own_split or single else f"{source}:{split}"
        return Source("saved" if saved else "hub", base, label, own_split or split, config)
    if isinstance(given, Path) or not HUB_ID.match(base):
        raise UserError(f"{source}: no such file or folder, and not a Hub dataset id (owner/name[@config][:split]); "
                        f"check the path; files must end in one of {', '.join(SUPPORTED)}")
    return Source("hub", base, source if own_split else f"{source}:{split}", own_split or split, config)


def _split_spec(spec: str) -> tuple[str, str | None, str | None]:
    """"owner/name@config:split" -> (owner/name, config, split); either suffix may be absent. A path that exists
    as given is never split (a folder may contain ':' or '@')."""
    if Path(spec).exists():
        return spec, None, None
    base, split = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and "@" not in tail:
        base, split = head, tail
    head, sep, tail = base.rpartition("@")
    if sep and head and tail and "/" not in tail:
        return head, tail, split
    return base, None, split


# ----------------------------------------------------------------------------------------------- reading rows


def read_rows(src: Source) -> Iterator[tuple[int, object]]:
    """Yield (row number, parsed row) for one source; I/O and decompression failures become UserError."""
    if src.kind != "file":
        yield from _dataset_rows(src)
        return
    path, source, kind = Path(src.path), src.source, _file_kind(Path(src.path))
    try:
        if kind == ".parquet":
            yield from _parquet_rows(path, source)
        elif kind in (".jsonl", ".jsonl.gz"):
            with _open_binary(path) as fh:
                yield from _json_lines(_decoded_lines(fh, source), source)
        else:  # .json / .json.gz: a JSON list, or JSON lines under a .json name (common on the Hub)
            yield from _json_file_rows(path, source)
    except (OSError, EOFError, zlib.error) as err:
        reason = _one_line(getattr(err, "strerror", None) or str(err) or type(err).__name__)
        raise UserError(f"{source}: cannot read the file ({reason}); check that it is a valid {kind} file") from err


def _dataset_rows(src: Source) -> Iterator[tuple[int, object]]:
    """Rows of a save_to_disk folder or a `load_dataset` target, as plain dicts (list<struct> -> list of dicts)."""
    dataset = _open_dataset(src)
    yield from enumerate(dataset, start=1)


def _open_dataset(src: Source):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{src.source}: reading Hugging Face datasets needs the datasets package: "
                        "pip install 'dpo-stages[datasets]'") from None
    datasets.disable_progress_bars()  # our own summary line says what was read
    try:
        if src.kind == "saved":
            loaded = datasets.load_from_disk(src.path)
        else:
            loaded = datasets.load_dataset(src.path, src.config, split=src.split)
    except Exception as err:  # noqa: BLE001 - the library raises many types (OSError, ValueError, hub errors...)
        reason = _one_line(str(err) or type(err).__name__, 120)
        fix = ("check the id, config and split; offline, the dataset must be in the local HF cache "
               "(HF_HUB_OFFLINE=1 skips the network)") if src.kind == "hub" else "check the folder"
        raise UserError(f"{src.source}: cannot load the dataset ({reason}); {fix}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if src.split not in loaded:
            raise UserError(f"{src.source}: no split {src.split!r} (it has {', '.join(loaded)}); "
                            "pick one with --data-split or FOLDER:SPLIT")
        loaded = loaded[src.split]
    return loaded


def _one_line(text: str, limit: int = 200) -> str:
    """Library messages can span lines; the CLI promises one."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decoded_lines(lines: Iterable[bytes], source: str) -> Iterator[tuple[int, str]]:
    """(line number, text) per line; decoding per line lets a bad byte be reported with its line."""
    for line_no, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{source}: line {line_no}: not valid UTF-8 (byte {err.start + 1}); re-save the file as UTF-8"
            ) from err
        yield line_no, text.lstrip("\ufeff") if line_no == 1 else text  # tolerate a byte-order mark


def _json_lines(lines: Iterable[tuple[int, str]], source: str) -> Iterator[tuple[int, object]]:
    """Parse JSON lines; the row number is the line number and blank lines are not rows."""
    for line_no, text in lines:
        if not text.strip():
            continue
        try:
            yield line_no, json.loads(text.rstrip("\r\n"))  # so an error at the end reports this line's column
        except json.JSONDecodeError as err:
            raise UserError(
                f"{source}: line {line_no}: not valid JSON ({err.msg} at column {err.colno}); "
                "fix or remove that line (each line must hold one JSON object)"
            ) from err


def _json_file_rows(path: Path, source: str) -> Iterator[tuple[int, object]]:
    with _open_binary(path) as fh:
        data = fh.read()
    lines = list(_decoded_lines(data.split(b"\n"), source))  # split on "\n" only: JSON strings may hold U+2028
    text = "\n".join(line for _, line in lines)
    if not text.lstrip().startswith("["):
        yield from _json_lines(lines, source)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{source}: line {err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file"
        ) from err
    yield from enumerate(rows, start=1)


def _parquet_rows(path: Path, source: str) -> Iterator[tuple[int, object]]:
    import pyarrow as pa  # local import: only parquet needs pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        reason = _one_line(str(err))
        raise UserError(f"{source}: cannot read the parquet file ({reason}); check that it is a valid parquet file") \
            from err
    # to_pylist turns list<struct> columns into lists of dicts, the same shape JSON gives
    yield from enumerate(table.to_pylist(), start=1)
