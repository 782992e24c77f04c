"""Reading an experiment's dataset: a JSONL, CSV or Parquet file, or inline items.

A file's rows become items through the spec's column mapping: `input_field`,
`expected_field` and `id_field` name the columns (JSONL keys) of each item's
input, expected answer and id; every other column is an extra field, kept as
text in the item's `metadata` and usable in the prompt template as `{column}`.

Rows are numbered as the file shows them, 1-based: a JSONL row is its line of
the file (blank lines are skipped but counted); a CSV row is the line on which
the record starts, the header being row 1 (so the first item is row 2); a
Parquet row is its index among the data rows (the first item is row 1). Without
an id column an item's id is `row-<n>`, that same number. Every problem is an
`InvalidInput` naming the file, the row and the column.

Files are read in one pass (CSV record by record, Parquet batch by batch), so
the cost grows with the number of rows, never with its square.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import decimal
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from konstruct.experiments.models import (
    AGENT_ITEM_FIELDS,
    PLACEHOLDER,
    DatasetFormat,
    DatasetItem,
    DatasetSpec,
    template_fields,
)
from konstruct.platform.errors import InvalidInput, field_problems
from konstruct.platform.settings import resolve_path

# The extension of a dataset file tells its format, unless the spec's `format` does.
EXTENSIONS: dict[str, DatasetFormat] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# The template names these whatever the columns are called.
RESERVED = ("input", "id")
# A CSV cell may hold a long context; the csv module refuses cells over 128 KiB.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024
_PARQUET_BATCH = 10_000


def as_text(value: Any) -> str:
    """A cell as the template shows it: None is empty, an integral float has no
    `.0`, true/false are lower case, lists and objects are JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        if value == value.to_integral_value():
            return format(value.to_integral_value(), "f")
        return format(value.normalize(), "f")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=as_text)
    return str(value)


def render_prompt(template: str, item_id: str, text: str, fields: dict[str, Any]) -> str:
    """The prompt of one item: `{input}`, `{id}` and each extra field `{name}`
    replaced in one pass (a value is never rendered again); `{{name}}` is the
    literal `{name}`; a placeholder naming nothing is left as written."""

    def replace(match: re.Match[str]) -> str:
        literal, name = match.group(1), match.group(2)
        if literal is not None:
            return "{" + literal + "}"
        if name == "input":
            return text
        if name == "id":
            return item_id
        if name in fields:
            return as_text(fields[name])
        return match.group(0)

    return PLACEHOLDER.sub(replace, template)


def check_template(template: str, items: Iterable[DatasetItem], spec: DatasetSpec) -> None:
    """Every placeholder of the template names `input`, `id` or a field some item has."""
    wanted = [name for name in template_fields(template) if name not in RESERVED]
    if not wanted:
        return
    available: dict[str, None] = {}
    for item in items:
        available.update(dict.fromkeys(item.metadata))
    missing = [name for name in wanted if name not in available]
    if not missing:
        return
    hints = []
    if spec.path is not None and spec.input_field in missing:
        hints.append(f"{spec.input_field!r} is the input column: write {{input}}")
    if spec.path is not None and spec.expected_field in missing:
        hints.append(f"{spec.expected_field!r} is the expected column, not given to the prompt")
    named = ", ".join("{" + n + "}" for n in missing)
    shown = ", ".join("{" + n + "}" for n in [*RESERVED, *available])
    raise InvalidInput(
        f"task.prompt_template: placeholder{'s' if len(missing) > 1 else ''} {named} "
        f"name{'' if len(missing) > 1 else 's'} no column of the dataset"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f"; available: {shown} (write {{{{{missing[0]}}}}} for the literal text)",
        ["task.prompt_template"],
    )


# --- reading a file -------------------------------------------------------------------


def _bad(message: str, field: str = "dataset.path") -> InvalidInput:
    return InvalidInput(f"{field}: {message}", [field])


class _Rows:
    """Turns a file's rows (column -> value) into items, one pass, ids checked."""

    def __init__(self, spec: DatasetSpec, path: Path, unit: str) -> None:
        self.spec = spec
        self.name = path.name
        self.unit = unit  # "line" (JSONL) or "row" (CSV, Parquet)
        # A column the spec renames must exist; `expected` and `id` may be absent.
        self.optional = {
            "expected_field": spec.expected_field == "expected",
            "id_field": spec.id_field == "id",
        }
        self.seen: dict[str, int] = {}
        self.items: list[DatasetItem] = []

    def where(self, number: int) -> str:
        return f"{self.unit} {number} of {self.name}"

    def check_columns(self, columns: Sequence[str], where: str) -> None:
        """A file with a header (CSV, Parquet): the mapped columns are there."""
        found = ", ".join(repr(c) for c in columns) or "none"
        spec = self.spec
        for attribute in ("input_field", "expected_field", "id_field"):
            column = getattr(spec, attribute)
            required = not self.optional.get(attribute, False)
            if required and column not in columns:
                raise _bad(
                    f"{where} has no column {column!r} (columns: {found}); set "
                    f"dataset.{attribute} to the column that holds the "
                    + {"input_field": "input", "expected_field": "expected answer"}.get(
                        attribute, "id"
                    ),
                    f"dataset.{attribute}",
                )

    def add(self, row: dict[str, Any], number: int, *, raw: bool = False) -> None:
        """One row; `raw` (JSONL): `expected` keeps its JSON value and a `metadata`
        object is merged into the extra fields, as the item form has them."""
        spec, where = self.spec, self.where(number)
        if spec.input_field not in row:
            keys = ", ".join(repr(k) for k in row) or "none"
            raise _bad(
                f"{where} has no column {spec.input_field!r} (its keys: {keys}); set "
                "dataset.input_field to the key that holds the input",
                "dataset.input_field",
            )
        value = row[spec.input_field]
        if isinstance(value, dict | list):
            raise _bad(f"{where}, column {spec.input_field!r}: the input must be text")
        text = as_text(value)
        if not text.strip():
            raise _bad(f"{where}, column {spec.input_field!r}: empty input (every row needs one)")
        if spec.id_field in row:
            raw_id = row[spec.id_field]
            if isinstance(raw_id, dict | list) or not as_text(raw_id).strip():
                raise _bad(f"{where}, column {spec.id_field!r}: empty or not a text id")
            item_id = as_text(raw_id)
        elif not self.optional["id_field"]:
            raise _bad(f"{where} has no column {spec.id_field!r}", "dataset.id_field")
        else:
            item_id = f"row-{number}"
        expected: Any = None
        if spec.expected_field in row:
            expected = row[spec.expected_field]
            if not raw:
                expected = as_text(expected) or None
        elif raw and not self.optional["expected_field"]:
            raise _bad(
                f"{where} has no column {spec.expected_field!r}",
                "dataset.expected_field",
            )
        mapped = {spec.input_field, spec.expected_field, spec.id_field}
        metadata: dict[str, Any] = {}
        legacy = row.get("metadata") if raw else None
        if isinstance(legacy, dict) and "metadata" not in mapped:
            metadata.update(legacy)
        for column, cell in row.items():
            if column in mapped or (column == "metadata" and isinstance(legacy, dict)):
                continue
            if column in metadata:
                raise _bad(f"{where}, column {column!r}: also a key of its `metadata` object")
            # An agent task's turns and tool fixtures keep their JSON in a JSONL file.
            keep = raw and column in AGENT_ITEM_FIELDS
            metadata[column] = cell if keep else as_text(cell)
        try:
            item = DatasetItem.model_validate(
                {"id": item_id, "input": text, "expected": expected, "metadata": metadata}
            )
        except ValidationError as exc:
            problems = "; ".join(f"{f}: {t}" for f, t in field_problems(exc, root="(item)"))
            raise _bad(f"{where}: {problems}") from None
        first = self.seen.get(item.id)
        if first is not None:
            raise _bad(
                f"{where} repeats id {item.id!r} (column {spec.id_field!r}; first on "
                f"{self.unit} {first})"
            )
        self.seen[item.id] = number
        self.items.append(item)

    def done(self) -> list[DatasetItem]:
        if not self.items:
            raise _bad(f"{self.name} has no items")
        return self.items


class _Lines:
    """A file's lines decoded one by one (a BOM dropped), counted: a byte that is
    not UTF-8 is named by its line, which a buffered text reader cannot do."""

    def __init__(self, handle: BinaryIO, name: str) -> None:
        self.handle = handle
        self.name = name
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self.handle:
            self.number += 1
            if self.number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _bad(
                    f"line {self.number} of {self.name} is not UTF-8 text (byte "
                    f"{exc.start + 1} of the line); save the file as UTF-8"
                ) from None


def _jsonl(spec: DatasetSpec, path: Path) -> list[DatasetItem]:
    rows = _Rows(spec, path, "line")
    with path.open("rb") as handle:
        for number, line in enumerate(_Lines(handle, path.name), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(
                    f"line {number} of {path.name} is not valid JSON: {exc.msg} "
                    f"(column {exc.colno})"
                ) from None
            if not isinstance(raw, dict):
                array = " (a JSON array: write one object per line)" if number == 1 else ""
                raise _bad(f"line {number} of {path.name} is not a JSON object{array}")
            rows.add(raw, number, raw=True)
    return rows.done()


def _csv(spec: DatasetSpec, path: Path) -> list[DatasetItem]:
    rows = _Rows(spec, path, "row")
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with path.open("rb") as handle:
        lines = _Lines(handle, path.name)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
            if header is None:
                raise _bad(f"{path.name} is empty: a CSV dataset starts with a header row")
            columns = [name.strip() for name in header]
            named = [c for c in columns if c]
            twice = sorted({c for c in named if named.count(c) > 1})
            if twice:
                raise _bad(f"row 1 (the header) of {path.name} names column {twice[0]!r} twice")
            rows.check_columns(named, f"row 1 (the header) of {path.name}")
            start = lines.number + 1
            for record in reader:
                number, start = start, lines.number + 1
                if not record:
                    continue  # a blank line
                if len(record) != len(columns):
                    raise _bad(
                        f"row {number} of {path.name} has {len(record)} fields where the "
                        f"header (row 1) has {len(columns)} ({', '.join(columns)})"
                    )
                rows.add({c: v for c, v in zip(columns, record, strict=True) if c}, number)
        except csv.Error as exc:
            raise _bad(f"row {lines.number} of {path.name} is not valid CSV: {exc}") from None
    return rows.done()


def _parquet_batches(path: Path) -> tuple[list[str], Iterator[list[dict[str, Any]]]]:
    import pyarrow as pa  # imported here: a JSONL or CSV dataset does not need it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _bad(f"{path.name} is not a Parquet file ({exc})") from None

    def batches() -> Iterator[list[dict[str, Any]]]:
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
                yield batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise _bad(f"{path.name} is not a readable Parquet file ({exc})") from None

    return list(parquet.schema_arrow.names), batches()


def _parquet(spec: DatasetSpec, path: Path) -> list[DatasetItem]:
    rows = _Rows(spec, path, "row")
    columns, batches = _parquet_batches(path)
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise _bad(f"the schema of {path.name} names column {twice[0]!r} twice")
    rows.check_columns(columns, f"the schema of {path.name}")
    number = 0
    for batch in batches:
        for record in batch:
            number += 1
            rows.add(record, number)
    return rows.done()


_READERS = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}


def dataset_format(spec: DatasetSpec, path: Path) -> DatasetFormat:
    if spec.format is not None:
        return spec.format
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        known = ", ".join(EXTENSIONS)
        raise _bad(
            f"cannot tell the format of {path.name} from its extension "
            f"{path.suffix or '(none)'!r}: known {known}; or set dataset.format "
            "(jsonl, csv, parquet)"
        )
    return found


def read_file(spec: DatasetSpec, path: Path) -> list[DatasetItem]:
    """The items of a dataset file, mapped by the spec."""
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise _bad(
            f"file {str(path)!r} {problem} (relative paths are read from the worker's "
            "project directory)"
        )
    return _READERS[dataset_format(spec, path)](spec, path)


def load_items(spec: DatasetSpec, base_dir: Path, template: str | None = None) -> list[DatasetItem]:
    """The dataset's items; with `template`, also checked to name only fields they have.
    A relative path is read beside the config file (`base_dir`), or, for a `deploy/...`
    sample not there, from the copy Konstruct ships."""
    if spec.path is not None:
        items = read_file(spec, resolve_path(base_dir, Path(spec.path)))
    else:
        items = spec.items or []
        if not items:
            raise InvalidInput("dataset.items: the dataset has no items", ["dataset.items"])
        seen: set[str] = set()
        for index, item in enumerate(items):
            if item.id in seen:
                raise InvalidInput(
                    f"dataset.items.{index}.id: id {item.id!r} appears twice", ["dataset.items"]
                )
            seen.add(item.id)
    if template is not None:
        check_template(template, items, spec)
    return items


def items_digest(items: list[DatasetItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.model_dump_json().encode())
        digest.update(b"\n")
    return digest.hexdigest()
