"""The peer: Inspect AI on the bench's items, run the way its users run it.

`python bench/peer_inspect.py ITEMS.jsonl` evaluates each item (`input`,
`expected`) with Inspect's defaults — `generate()` then `match()`, its OpenAI
provider pointed at the simulator (OPENAI_BASE_URL, OPENAI_API_KEY) with
`responses_api=false` (its default calls /v1/responses, which the simulator
does not serve) — and prints one JSON line: items, samples scored, accuracy.
Run as a subprocess by `bench/experiments.py --peer inspect`, so its CPU is
its own, with the interpreter of its own venv: Inspect AI 0.3.285 needs
openai>=3.4, which Konstruct's pinned litellm is not tested with.

    python3 -m venv .venv-peer && .venv-peer/bin/pip install inspect-ai==0.3.285 'openai>=3.4'
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    from inspect_ai import Task, eval
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.scorer import match
    from inspect_ai.solver import generate

    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line]
    model = sys.argv[2] if len(sys.argv) > 2 else "openai/sim-fast"
    samples = [
        Sample(input=f"Answer with a number: {row['input']}", target=str(row["expected"]))
        for row in rows
    ]
    task = Task(dataset=MemoryDataset(samples), solver=generate(), scorer=match())
    with tempfile.TemporaryDirectory(prefix="inspect-logs-") as logs:
        (log,) = eval(
            task,
            model=model,
            model_args={"responses_api": False},
            log_dir=logs,
            display="none",
        )
    scored = log.results.scores[0].metrics if log.results and log.results.scores else {}
    print(
        json.dumps(
            {
                "items": len(rows),
                "status": log.status,
                "samples": log.results.completed_samples if log.results else 0,
                "accuracy": scored["accuracy"].value if "accuracy" in scored else None,
            }
        )
    )


if __name__ == "__main__":
    main()
