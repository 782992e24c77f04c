"""What the stack benchmarks share: a dev stack on free ports, and the results file.

The stack is started exactly as `konstruct up` starts it (dev server with its
state file, embedded PostgreSQL, the simulator, one worker process), with the
simulator's models at 0 latency.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from konstruct.app.processes import free_port
from konstruct.app.stack import Stack
from konstruct.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def write_stack_config(directory: Path, models: Sequence[str], gateway: bool = False) -> Path:
    simulator = directory / "simulator.yaml"
    simulator.write_text("models:\n" + "".join(f"  {m}: {{latency_ms: 0}}\n" for m in models))
    config = directory / "bench.yaml"
    config.write_text(
        f"state_dir: {directory / 'state'}\n"
        f"temporal: {{port: {free_port()}, ui_port: {free_port()}, codec_port: {free_port()}}}\n"
        f"postgres: {{port: {free_port()}}}\n"
        f"simulator: {{port: {free_port()}, config: {simulator}}}\n"
        f"llm: {{router_config: {ROOT / 'deploy' / 'llm-router.yaml'}}}\n"
        # No HTTP gateway unless asked for: its in-process worker would be one
        # more than the --workers N a benchmark measures.
        + (f"gateway: {{port: {free_port()}}}\n" if gateway else "gateway: {enabled: false}\n")
    )
    return config


@contextmanager
def running_stack(
    prefix: str, models: Sequence[str], gateway: bool = False
) -> Iterator[tuple[Path, Stack]]:
    """A started stack in a temporary directory: (its config file, the stack)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        config = write_stack_config(Path(tmp), models, gateway)
        stack = Stack(load_settings(config))
        os.environ.setdefault(stack.settings.simulator.api_key_env, "sim-bench-" + uuid.uuid4().hex)
        stack.start(say=lambda _line: None)
        try:
            yield config, stack
        finally:
            stack.stop()


def write_results(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
