"""Reading an experiment's dataset: a JSONL file or inline items, validated line by line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from konstruct.errors import InvalidInput, field_problems
from konstruct.models.experiments import DatasetItem, DatasetSpec


def _problem(error: ValidationError) -> str:
    return "; ".join(f"{field}: {text}" for field, text in field_problems(error, root="(item)"))


def read_jsonl(path: Path) -> list[DatasetItem]:
    if not path.is_file():
        raise InvalidInput(
            f"dataset.path: file {str(path)!r} does not exist (relative paths are read "
            "from the worker's project directory)",
            ["dataset.path"],
        )
    items: list[DatasetItem] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(
                    f"dataset.path: line {number} of {path.name} is not valid JSON: {exc.msg}",
                    ["dataset.path"],
                ) from None
            try:
                item = DatasetItem.model_validate(raw)
            except ValidationError as exc:
                raise InvalidInput(
                    f"dataset.path: line {number} of {path.name}: {_problem(exc)}"
                    ' (each line is {"id", "input", "expected"})',
                    ["dataset.path"],
                ) from None
            if item.id in seen:
                raise InvalidInput(
                    f"dataset.path: line {number} of {path.name} repeats id {item.id!r} "
                    f"(first on line {seen[item.id]})",
                    ["dataset.path"],
                )
            seen[item.id] = number
            items.append(item)
    if not items:
        raise InvalidInput(f"dataset.path: {path.name} has no items", ["dataset.path"])
    return items


def load_items(spec: DatasetSpec, base_dir: Path) -> list[DatasetItem]:
    if spec.path is not None:
        path = Path(spec.path)
        return read_jsonl(path if path.is_absolute() else base_dir / path)
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
    return items


def items_digest(items: list[DatasetItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.model_dump_json().encode())
        digest.update(b"\n")
    return digest.hexdigest()
