"""`konstruct experiments compare A B [C …]`, `experiments gate EXP --baseline BASE` and
`konstruct experiments report EXP`.

Both read PostgreSQL only (`konstruct.experiments.store.analysis`), so they work on any
experiment with stored results, finished or not, with or without Temporal.
Registered on the `experiments` group by `konstruct.app.cli.experiments`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Column

from konstruct.app.cli.common import (
    CliState,
    in_tenant,
    json_option,
    pass_state,
    run_async,
    tenant_option,
)
from konstruct.app.cli.output import print_json, print_table
from konstruct.experiments.compare import Comparison, compare
from konstruct.experiments.report import DEFAULT_MAX_ROWS, render_report
from konstruct.experiments.statistics import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES

if TYPE_CHECKING:
    import asyncpg

    from konstruct.config import Settings
    from konstruct.experiments.matrix import Matrix
    from konstruct.experiments.records import ExperimentData

# The level of the paired bootstrap's interval (compare, gate).
confidence_option = click.option(
    "--confidence",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_CONFIDENCE,
    show_default=True,
    help="the interval's level",
)

# Flipped item ids printed per eval and direction (--json lists every one).
SHOWN_FLIPS = 20


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ids(ids: list[str]) -> str:
    shown = " ".join(ids[:SHOWN_FLIPS])
    more = len(ids) - SHOWN_FLIPS
    return shown + (f" … and {more} more (--json lists all)" if more > 0 else "")


def print_comparison(c: Comparison) -> None:
    """The comparison for people: the two runs, the eval table, its notes, the costs."""
    _print_runs(c)
    _print_evals(c)
    _print_eval_notes(c)
    _print_operations(c)


def _print_runs(c: Comparison) -> None:
    for label, s in (("A", c.a), ("B", c.b)):
        print(
            f"{label}  {s.experiment_id}  {s.name}  {s.status}  {s.total} items"
            f" ({s.ok} ok, {s.failed} failed, {s.pending} without a result)"
        )
    i = c.items
    by = (
        " (dataset items: each one's mean over its epochs)"
        if c.method.paired_by == "dataset_item"
        else ""
    )
    print(f"items: {i.shared} shared, {i.only_a} only in A, {i.only_b} only in B{by}")


def _print_evals(c: Comparison) -> None:
    """One row per eval: means, the difference and its interval, pass rates, flips."""
    pct = f"{c.method.confidence:.0%}"
    print_table(
        [
            "eval",
            Column("paired", justify="right"),
            Column("mean A", justify="right"),
            Column("mean B", justify="right"),
            Column("B - A", justify="right"),
            Column(f"{pct} CI", justify="right"),
            Column("pass A", justify="right"),
            Column("pass B", justify="right"),
            Column("pass->fail", justify="right"),
            Column("fail->pass", justify="right"),
        ],
        [
            (
                e.name,
                e.paired,
                _num(e.mean_a),
                _num(e.mean_b),
                _num(e.diff, signed=True) + (" *" if e.excludes_zero else ""),
                (
                    f"[{_num(e.ci_low, signed=True)}, {_num(e.ci_high, signed=True)}]"
                    if e.ci_low is not None
                    else "n/a"
                ),
                "n/a" if e.pass_rate_a is None else f"{e.pass_rate_a:.1%}",
                "n/a" if e.pass_rate_b is None else f"{e.pass_rate_b:.1%}",
                len(e.flips.pass_to_fail),
                len(e.flips.fail_to_pass),
            )
            for e in c.evals
        ],
    )
    print(
        f"  * the {pct} interval excludes 0. Paired bootstrap over the items scored in both,"
        f" {c.method.resamples} resamples, seed {c.method.seed}."
    )


def _print_eval_notes(c: Comparison) -> None:
    """Per eval, what was left out of the pairs and which items flipped."""
    for e in c.evals:
        if e.unscored_a or e.unscored_b:
            print(
                f"  {e.name}: {e.unscored_a} shared item(s) without a score in A,"
                f" {e.unscored_b} in B (failed or pending): left out of the pairs"
            )
        for word, ids in (
            ("pass->fail", e.flips.pass_to_fail),
            ("fail->pass", e.flips.fail_to_pass),
        ):
            if ids:
                print(f"  {e.name} {word} ({len(ids)}): {_ids(ids)}")
    for label, names in (("A", c.evals_only_a), ("B", c.evals_only_b)):
        if names:
            print(f"  evals only in {label} (not compared): {', '.join(names)}")


def _money(v: float | None, unknown: int) -> str:
    if v is None:
        return "n/a"
    return f"{v:.6f}" + (f" ({unknown} unknown)" if unknown else "")


def _print_operations(c: Comparison) -> None:
    """What all results of each run took: latency, tokens, cost, time, retries."""
    a, b = c.operations["a"], c.operations["b"]
    print_table(
        ["all results", Column("A", justify="right"), Column("B", justify="right")],
        [
            ("latency p50 ms", _num(a.latency_p50_ms, 1), _num(b.latency_p50_ms, 1)),
            ("latency p95 ms", _num(a.latency_p95_ms, 1), _num(b.latency_p95_ms, 1)),
            ("prompt tokens", f"{a.prompt_tokens:,}", f"{b.prompt_tokens:,}"),
            ("completion tokens", f"{a.completion_tokens:,}", f"{b.completion_tokens:,}"),
            ("cost USD", _money(a.cost_usd, a.cost_unknown), _money(b.cost_usd, b.cost_unknown)),
            ("duration s", _num(a.duration_s, 1), _num(b.duration_s, 1)),
            ("429s (retried)", f"{a.throttled:,}", f"{b.throttled:,}"),
            ("call failures (retried)", f"{a.call_failures:,}", f"{b.call_failures:,}"),
        ],
    )


def load_runs(settings: Settings, tenant: str, experiments: list[str]) -> list[ExperimentData]:
    """The experiments' stored results, in the order named."""
    from konstruct.experiments.store.analysis import load_experiment

    async def load(conn: asyncpg.Connection) -> list[ExperimentData]:
        return [await load_experiment(conn, tenant, e) for e in experiments]

    return in_tenant(settings, tenant, load)


def compare_runs(settings: Settings, tenant: str, experiments: list[str]) -> int:
    """The matrix of three or more experiments, as `compare` prints it by default."""
    from konstruct.experiments.matrix import matrix

    return _show_matrix(matrix(load_runs(settings, tenant, experiments)), as_json=False)


def _show_matrix(m: Matrix, as_json: bool) -> int:
    if not m.shared_items:
        raise click.ClickException(
            f"experiments {', '.join(r.experiment_id for r in m.runs)} share no item id:"
            " compare runs of the same dataset"
        )
    if as_json:
        print_json(m)
    else:
        print_matrix(m)
    return 0


def print_matrix(m: Matrix) -> None:
    """The runs numbered, each eval's mean and interval per run, the costs, the pairs."""
    pct = f"{m.method.confidence:.0%}"
    for n, s in enumerate(m.runs, 1):
        print(
            f"{n}  {s.experiment_id}  {s.name}  {s.status}  {s.total} items"
            f" ({s.ok} ok, {s.failed} failed, {s.pending} without a result)"
        )
    by = (
        " (dataset items: each one's mean over its epochs)"
        if m.method.paired_by != "item_id"
        else ""
    )
    print(f"items: {m.shared_items} in every run{by}")

    def numbers() -> list[Column]:
        # New columns per table: a rich Column keeps the cells it was given.
        return [Column(str(n), justify="right") for n in range(1, len(m.runs) + 1)]

    print_table(
        [f"eval: mean [{pct} CI]", *numbers()],
        [
            (
                e.name,
                *(
                    "n/a"
                    if c.mean is None
                    else f"{c.mean:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]"
                    + (" *" if c.best else "")
                    for c in e.cells
                ),
            )
            for e in m.evals
        ],
    )
    print(
        f"  * the highest mean. Bootstrap over the items every run scored,"
        f" {m.method.resamples} resamples, seed {m.method.seed}."
    )
    if m.evals_not_in_every_run:
        print(f"  evals not in every run (not shown): {', '.join(m.evals_not_in_every_run)}")
    ops = [m.operations[s.experiment_id] for s in m.runs]
    print_table(
        ["all results", *numbers()],
        [
            ("latency p50 ms", *(_num(o.latency_p50_ms, 1) for o in ops)),
            ("total tokens", *(f"{o.total_tokens:,}" for o in ops)),
            ("cost USD", *(_money(o.cost_usd, o.cost_unknown) for o in ops)),
            ("duration s", *(_num(o.duration_s, 1) for o in ops)),
            ("429s (retried)", *(f"{o.throttled:,}" for o in ops)),
        ],
    )
    if m.pairs:
        number = {s.experiment_id: n for n, s in enumerate(m.runs, 1)}
        print_table(
            [
                "pair",
                "eval",
                Column("paired", justify="right"),
                Column("B - A", justify="right"),
                Column(f"{pct} CI", justify="right"),
            ],
            [
                (
                    f"{number[p.b]} - {number[p.a]}",
                    p.eval,
                    p.paired,
                    _num(p.diff, signed=True) + (" *" if p.excludes_zero else ""),
                    "n/a"
                    if p.ci_low is None
                    else f"[{_num(p.ci_low, signed=True)}, {_num(p.ci_high, signed=True)}]",
                )
                for p in m.pairs
            ],
        )
        print(f"  * the {pct} interval excludes 0 (paired bootstrap over the items both scored).")


# How often `compare --sequential` reads the two experiments again.
SEQUENTIAL_POLL_S = 1.0
_ENDED = ("completed", "incomplete", "failed", "stopped")


def _follow_until_decided(
    settings: Settings,
    tenant: str,
    experiments: tuple[str, ...],
    eval_name: str | None,
    margin: float | None,
    confidence: float,
) -> int:
    """Read both again until the difference is known or both have ended; stop both once
    it is known, and say what the items left would have cost."""
    import time

    from konstruct.experiments.sequential import decide

    ids = list(experiments)
    while True:
        a, b = load_runs(settings, tenant, ids)
        name = _sequential_eval(a, b, eval_name)
        d = decide(a, b, name, confidence=confidence, margin=margin)
        ended = a.status in _ENDED and b.status in _ENDED
        if d.verdict is not None or ended:
            break
        time.sleep(SEQUENTIAL_POLL_S)
    level = f"{confidence:.0%} anytime-valid interval"
    if d.verdict is None or d.interval is None or d.decided_at is None:
        shown = (
            f"[{_num(d.interval.low, signed=True)}, {_num(d.interval.high, signed=True)}]"
            if d.interval is not None
            else "n/a"
        )
        print(f"{name}: undecided after all {d.pairs} pairs (both ended): {level} {shown}")
        return 0
    says = "B differs from A" if d.verdict == "differs" else f"B is within ±{margin:g} of A"
    print(
        f"{name}: B - A {_num(d.interval.estimate, signed=True)}, {level}"
        f" [{_num(d.interval.low, signed=True)}, {_num(d.interval.high, signed=True)}]"
        f" after {d.decided_at} pairs: {says}"
    )
    for run in (a, b):
        if run.status not in _ENDED:
            run_async(_stop(settings, tenant, run.experiment_id))
    _print_not_run(load_runs(settings, tenant, ids))
    return 0


async def _stop(settings: Settings, tenant: str, experiment: str) -> None:
    """Stop the experiment and wait until it has (its calls in flight finish first).
    A refused stop needs no wait: the experiment has ended, is stopping, or waits
    for a person (a spent budget), and sends nothing new either way."""
    import asyncio

    from konstruct.app.cli.common import app_pool
    from konstruct.app.cli.experiment_toggles import send_toggle
    from konstruct.experiments.store.lookup import experiment_row
    from konstruct.platform.db import tenant_transaction

    if await send_toggle(settings, tenant, experiment, "stop") != 0:
        return
    async with app_pool(settings) as pool:
        while True:
            async with tenant_transaction(pool, tenant) as conn:
                row = await experiment_row(conn, tenant, experiment, "status")
            if row["status"] in _ENDED:
                return
            await asyncio.sleep(SEQUENTIAL_POLL_S / 4)


def _print_not_run(runs: list[ExperimentData]) -> None:
    saved = 0.0
    parts = []
    for label, run in zip("AB", runs, strict=True):
        done = [i for i in run.items if i.status != "pending"]
        left = run.total - len(done)
        costs = [i.cost_usd for i in done if i.cost_usd is not None]
        if costs:
            saved += left * sum(costs) / len(costs)
        parts.append(f"{left} item(s) of {label} ({run.experiment_id}, {run.status})")
    print(
        f"not run: {', '.join(parts)}; about ${saved:.6f} not spent"
        " (each experiment's cost per item so far)"
    )


def _sequential_eval(a: ExperimentData, b: ExperimentData, wanted: str | None) -> str:
    from konstruct.platform.errors import InvalidInput

    if any(i.epoch > 1 for run in (a, b) for i in run.items):
        raise InvalidInput(
            "experiments compare: --sequential: an experiment ran epochs; follow runs of one epoch",
            ["--sequential"],
        )
    shared = [n for n in a.eval_names() if n in b.eval_names()]
    if not shared:
        raise InvalidInput(
            "experiments compare: --sequential: the two experiments share no eval", ["--eval"]
        )
    if wanted is None:
        return shared[0]
    if wanted not in shared:
        raise InvalidInput(
            f"experiments compare: --eval {wanted!r}: not an eval of both experiments"
            f" (shared: {', '.join(shared) or 'none'})",
            ["--eval"],
        )
    return wanted


@click.command("compare")
@click.argument("experiments", nargs=-1, required=True)
@tenant_option
@click.option(
    "--resamples",
    type=click.IntRange(min=1),
    default=DEFAULT_RESAMPLES,
    show_default=True,
    help="bootstrap resamples",
)
@click.option("--seed", type=int, default=0, show_default=True, help="bootstrap seed")
@confidence_option
@click.option(
    "--pairs",
    is_flag=True,
    help="with three or more: each pair's paired difference too",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="two running experiments: follow them, and stop both once the difference"
    " is known (an anytime-valid interval; docs/reports.md)",
)
@click.option(
    "--eval", "eval_name", help="with --sequential: the eval that decides (default: the first)"
)
@click.option(
    "--margin",
    type=click.FloatRange(0, 1, min_open=True),
    help="with --sequential: also decide once the difference is known to be within ±MARGIN",
)
@json_option("print the comparison as JSON (shape: docs/reports.md)")
@pass_state
def compare_command(
    state: CliState,
    experiments: tuple[str, ...],
    tenant: str,
    resamples: int,
    seed: int,
    confidence: float,
    pairs: bool,
    sequential: bool,
    eval_name: str | None,
    margin: float | None,
    as_json: bool,
) -> int:
    """Experiment B against A, item by item: score differences with a paired
    bootstrap interval, flipped items, latency, tokens and cost. Three or more:
    a matrix of each eval's mean and interval per experiment, the best marked.

    EXPERIMENTS: A B, or more (a sweep's; docs/reports.md)."""
    from konstruct.platform.errors import InvalidInput

    if len(experiments) < 2:
        raise InvalidInput(
            "experiments compare: EXPERIMENTS: give two experiments, or more", ["EXPERIMENTS"]
        )
    if len(set(experiments)) < len(experiments):
        raise InvalidInput(
            "experiments compare: EXPERIMENTS: an experiment is named twice", ["EXPERIMENTS"]
        )

    if sequential:
        if len(experiments) != 2:
            raise InvalidInput(
                "experiments compare: --sequential follows two experiments", ["--sequential"]
            )
        return _follow_until_decided(
            state.settings, tenant, experiments, eval_name, margin, confidence
        )
    runs = load_runs(state.settings, tenant, list(experiments))
    if len(runs) > 2:
        from konstruct.experiments.matrix import matrix

        found = matrix(runs, pairs=pairs, resamples=resamples, seed=seed, confidence=confidence)
        return _show_matrix(found, as_json)
    a, b = runs
    experiment_a, experiment_b = experiments
    # Paired by item id, or by dataset item when either ran epochs (`compare` decides).
    result = compare(a, b, resamples=resamples, seed=seed, confidence=confidence)
    if not result.items.shared:
        raise click.ClickException(
            f"experiments {experiment_a!r} ({len(a.items)} items) and {experiment_b!r}"
            f" ({len(b.items)} items) share no item id: compare two runs of the same dataset"
        )
    if as_json:
        print_json(result)
    else:
        print_comparison(result)
    return 0


@click.command("report")
@click.argument("experiment")
@tenant_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="the HTML file to write (default: EXPERIMENT.html in the current directory)",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_ROWS,
    show_default=True,
    help="items in the page's table (the plots and summary cover all)",
)
@pass_state
def report_command(
    state: CliState, experiment: str, tenant: str, out: Path | None, max_rows: int
) -> int:
    """One self-contained HTML page about an experiment: summary, plots, items."""
    from konstruct.experiments.store.analysis import load_experiment

    data = in_tenant(state.settings, tenant, lambda conn: load_experiment(conn, tenant, experiment))
    path = out if out is not None else Path(f"{experiment}.html")
    page = render_report(data, max_rows=max_rows)
    path.write_text(page, encoding="utf-8")
    rows = min(len(data.items), max_rows)
    print(
        f"wrote {path} ({len(page.encode()) / 1024:,.0f} KiB: {len(data.items)} items,"
        f" {rows} in its table)"
    )
    return 0


@click.command("gate")
@click.argument("experiment")
@click.option("--baseline", required=True, help="the experiment to hold EXPERIMENT against")
@tenant_option
@click.option(
    "--max-drop",
    "max_drops",
    multiple=True,
    metavar="EVAL=X",
    help="EVAL's mean may fall below the baseline's by at most X (paired; repeatable)",
)
@click.option(
    "--min",
    "minimums",
    multiple=True,
    metavar="EVAL=V",
    help="EVAL's mean must be at least V (repeatable)",
)
@click.option("--max-cost-usd", type=click.FloatRange(min=0), help="the calls cost at most this")
@click.option(
    "--strict",
    is_flag=True,
    help="a drop beyond --max-drop fails on its estimate alone (default: only when its"
    " interval lies below zero)",
)
@click.option(
    "--markdown",
    "markdown_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)",
)
@confidence_option
@json_option("print the verdict as JSON")
@pass_state
def gate_command(
    state: CliState,
    experiment: str,
    baseline: str,
    tenant: str,
    max_drops: tuple[str, ...],
    minimums: tuple[str, ...],
    max_cost_usd: float | None,
    strict: bool,
    markdown_file: Path | None,
    confidence: float,
    as_json: bool,
) -> int:
    """Exit 0 when an experiment holds every rule against a baseline, 1 when one fails.

    Exit 2 for bad arguments. Prints each rule with what was measured: for a
    drop, the paired difference and its interval (docs/reports.md)."""
    from konstruct.experiments.compare import eval_stats
    from konstruct.experiments.gate import Rule, judge, markdown, parse_rule, unknown_evals
    from konstruct.experiments.store.analysis import load_experiment
    from konstruct.platform.errors import InvalidInput

    rules: list[Rule] = []
    for option, kind, texts in (
        ("--max-drop", "max_drop", max_drops),
        ("--min", "min", minimums),
    ):
        for text in texts:
            try:
                rules.append(parse_rule(kind, text))  # type: ignore[arg-type]
            except ValueError as error:
                raise InvalidInput(f"experiments gate: {option} {error}", [option]) from None
    if max_cost_usd is not None:
        rules.append(Rule("max_cost_usd", max_cost_usd))
    if not rules:
        raise InvalidInput(
            "experiments gate: give at least one rule (--max-drop, --min, --max-cost-usd)",
            ["--max-drop"],
        )

    async def load(conn: asyncpg.Connection) -> tuple[ExperimentData, ExperimentData]:
        return (
            await load_experiment(conn, tenant, baseline),
            await load_experiment(conn, tenant, experiment),
        )

    base, candidate = in_tenant(state.settings, tenant, load)
    comparison = compare(base, candidate, confidence=confidence)
    stats = eval_stats(candidate)
    unknown = unknown_evals(rules, comparison, stats)
    if unknown:
        have = ", ".join(e.name for e in comparison.evals) or "none"
        raise InvalidInput(
            f"experiments gate: {', '.join(unknown)}: no such eval in both experiments"
            f" (shared: {have})",
            ["--max-drop" if "max-drop" in unknown[0] else "--min"],
        )
    if any(r.kind == "max_drop" for r in rules) and not comparison.items.shared:
        raise InvalidInput(
            f"experiments gate: {experiment!r} and {baseline!r} share no item id: gate a run"
            " of the baseline's dataset",
            ["--baseline"],
        )
    result = judge(comparison, stats, rules, strict)
    if markdown_file is not None:
        markdown_file.write_text(markdown(result))
    if as_json:
        print_json(result)
    else:
        print(
            f"gate {'passed' if result.passed else 'FAILED'}: {experiment} against {baseline}"
            f" ({result.paired_items} paired items)"
        )
        for outcome in result.rules:
            print(f"  {'pass' if outcome.passed else 'FAIL'}  {outcome.rule}: {outcome.measured}")
    return 0 if result.passed else 1
