"""`konstruct experiments report`: one self-contained HTML file about one experiment.

No external URL, no CDN: the plots are matplotlib SVG inlined in the page, the
style and the item filters (a little vanilla JavaScript) are inline too. Every
text from the dataset, the model or the database is escaped (`html.escape`).
The same experiment gives the same bytes: SVG ids come from a fixed salt, the
SVG carries no date, the page no time of its making.

Open the page with `#selftest` at the end of its address and the script runs
its filters once each and writes the counts to `<pre id="selftest">` (the
end-to-end test reads them from Chromium's DOM).
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from konstruct.experiments.compare import (
    Bucket,
    bucket_width,
    eval_stats,
    operations,
    side,
    timeline,
)
from konstruct.experiments.records import ExperimentData, ItemResult
from konstruct.experiments.statistics import histogram, passed, percentile, score_of
from konstruct.experiments.trajectory import Transcript

DEFAULT_MAX_ROWS = 5000
_INPUT_CHARS = 200
_OUTPUT_CHARS = 300
_LATENCY_BINS = 30
_SCORE_BINS = 10

_BLUE, _GREEN, _RED, _ORANGE, _GREY = "#1f6feb", "#2da44e", "#cf222e", "#d4a72c", "#8c959f"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _clip(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _fmt(value: float | None, digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


# --- plots -------------------------------------------------------------------------------

_SVG_START = re.compile(r"^.*?(?=<svg\b)", re.S)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)


def _svg(name: str, draw: Callable[[Any], None], size: tuple[float, float] = (8.0, 2.8)) -> str:
    """A matplotlib figure drawn by `draw(figure)`, as SVG text to inline.

    Its ids are prefixed with `name`, so several plots share one page.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    style: Any = {  # rc keys are Literal-typed in matplotlib's stubs
        "svg.hashsalt": f"konstruct-{name}",
        "svg.fonttype": "none",
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }
    with matplotlib.rc_context(style):
        figure = Figure(figsize=size, layout="constrained")
        draw(figure)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = _METADATA.sub("", _SVG_START.sub("", buffer.getvalue(), count=1), count=1)
    svg = re.sub(r'\bid="', f'id="{name}-', svg)
    svg = svg.replace("url(#", f"url(#{name}-").replace('href="#', f'href="#{name}-')
    return svg.replace("<svg ", f'<svg class="plot" data-plot="{_e(name)}" ', 1)


def _bars(ax: Any, edges: Sequence[float], counts: Sequence[int], color: str) -> None:
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=color, edgecolor="white")


def score_plot(exp: ExperimentData, names: Sequence[str]) -> str | None:
    """One histogram of scores per eval, side by side."""
    scores = {n: [s for i in exp.items if (s := score_of(i, n)) is not None] for n in names}
    shown = [n for n in names if scores[n]]
    if not shown:
        return None
    edges = [k / _SCORE_BINS for k in range(_SCORE_BINS + 1)]

    def draw(figure: Any) -> None:
        axes = figure.subplots(1, len(shown), squeeze=False)[0]
        for ax, name in zip(axes, shown, strict=True):
            counts = histogram(scores[name], 0.0, 1.0, _SCORE_BINS)
            _bars(ax, edges, counts, _BLUE)
            ax.set_title(f"{name} ({len(scores[name])} scored)")
            ax.set_xlabel("score")
            ax.set_xlim(0, 1)
        axes[0].set_ylabel("items")

    width = max(4.0, min(3.2 * len(shown), 12.0))
    return _svg("scores", draw, (width, 2.6))


def latency_plot(exp: ExperimentData) -> str | None:
    latencies = [i.latency_ms for i in exp.items if i.latency_ms is not None]
    if not latencies:
        return None
    lo, hi = min(latencies), max(latencies)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    step = (hi - lo) / _LATENCY_BINS
    edges = [lo + k * step for k in range(_LATENCY_BINS + 1)]
    counts = histogram(latencies, lo, hi, _LATENCY_BINS)
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)

    def draw(figure: Any) -> None:
        ax = figure.subplots()
        _bars(ax, edges, counts, _BLUE)
        marks = ((p50, "p50", _GREEN, -10), (p95, "p95", _ORANGE, -22))
        for value, label, color, below in marks:
            if value is not None:
                ax.axvline(value, color=color, linestyle="--", linewidth=1.2)
                ax.annotate(
                    f"{label} {value:,.0f} ms",
                    (value, 1),
                    xycoords=("data", "axes fraction"),
                    xytext=(4, below),
                    textcoords="offset points",
                    color=color,
                )
        ax.set_xlabel("latency of the call that stored the result (ms)")
        ax.set_ylabel("items")

    return _svg("latency", draw)


def throughput_plot(
    buckets: Sequence[Bucket], width_s: float, *, recorded: bool = False
) -> str | None:
    """Results per second above; below, the 429s and failed provider calls as
    they happened (`recorded`), else the extra attempts of the stored results."""
    if not buckets:
        return None
    xs = [b.start_s + width_s / 2 for b in buckets]
    starts = [b.start_s for b in buckets]

    def draw(figure: Any) -> None:
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        for key, color in (("ok", _BLUE), ("failed", _RED)):
            rates = [getattr(b, key) / width_s for b in buckets]
            top.plot(xs, rates, color=color, label=key, drawstyle="steps-mid")
        top.set_ylabel("results / s")
        top.set_ylim(bottom=0)
        top.legend(loc="upper right", frameon=False)
        if recorded:
            throttled = [b.throttled for b in buckets]
            failures = [b.call_failures for b in buckets]
            bottom.bar(starts, throttled, width=width_s, align="edge", color=_ORANGE, label="429s")
            bottom.bar(
                starts,
                failures,
                bottom=throttled,
                width=width_s,
                align="edge",
                color=_RED,
                label="call failures",
            )
            bottom.set_ylabel("retried calls")
            top_value = max(t + f for t, f in zip(throttled, failures, strict=True))
        else:
            bottom.bar(
                starts,
                [b.retries for b in buckets],
                width=width_s,
                align="edge",
                color=_ORANGE,
                label="extra attempts (429s and call failures, retried)",
            )
            bottom.set_ylabel("extra attempts")
            top_value = max(b.retries for b in buckets)
        bottom.set_ylim(0, max(1, top_value) * 1.15)
        bottom.yaxis.get_major_locator().set_params(integer=True)
        bottom.set_xlabel(f"seconds since the experiment was created ({width_s:g} s buckets)")
        bottom.legend(loc="upper right", frameon=False)

    return _svg("throughput", draw, (8.0, 3.8))


def cost_plot(buckets: Sequence[Bucket], width_s: float) -> str | None:
    if not any(b.cost_usd for b in buckets):
        return None
    xs, total, cumulative = [], 0.0, []
    for b in buckets:
        total += b.cost_usd
        xs.append(b.start_s + width_s)
        cumulative.append(total)

    def draw(figure: Any) -> None:
        ax = figure.subplots()
        ax.step([0.0, *xs], [0.0, *cumulative], where="post", color=_GREEN)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("cumulative cost (USD)")
        ax.set_xlabel("seconds since the experiment was created")

    return _svg("cost", draw)


# --- the page ------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; --line: #d0d7de; --muted: #57606a; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
  max-width: 1180px; padding: 16px 24px 48px; color: #1f2328; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 17px; margin: 28px 0 8px;
  border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.muted, .note { color: var(--muted); } .note { font-size: 13px; }
table { border-collapse: collapse; } th, td { padding: 3px 8px; text-align: left;
  border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.card b { display: block; font-size: 18px; } .card span { color: var(--muted); font-size: 12px; }
svg.plot { max-width: 100%; height: auto; display: block; }
.pass { color: #1a7f37; } .fail { color: #cf222e; } .st-failed { background: #fff5f5; }
.st-pending { color: var(--muted); }
#filters { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 8px 0; }
#filters input[type=search] { min-width: 260px; padding: 3px 6px; }
#items-table td.t { max-width: 360px; overflow-wrap: anywhere; white-space: pre-wrap; }
details.transcript pre { font-size: 12px; max-height: 24em; overflow: auto; margin: 4px 0; }
#items-wrap { max-height: 900px; overflow: auto; border: 1px solid var(--line); }
"""

_JS = """
(function () {
  "use strict";
  var table = document.getElementById("items-table");
  if (!table) { return; }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var texts = rows.map(function (r) {
    return Array.prototype.map.call(r.querySelectorAll(".s"), function (c) {
      return c.textContent;
    }).join("\\n").toLowerCase();
  });
  var status = document.getElementById("f-status");
  var search = document.getElementById("f-text");
  var evals = Array.prototype.slice.call(document.querySelectorAll("select[data-eval]"));
  var shown = document.getElementById("shown");
  function apply() {
    var s = status.value, q = search.value.trim().toLowerCase(), n = 0;
    rows.forEach(function (r, i) {
      var keep = (!s || r.getAttribute("data-status") === s) &&
        (!q || texts[i].indexOf(q) !== -1) &&
        evals.every(function (e) {
          return !e.value || r.getAttribute("data-e" + e.getAttribute("data-eval")) === e.value;
        });
      r.hidden = !keep;
      if (keep) { n += 1; }
    });
    shown.textContent = String(n);
    table.setAttribute("data-shown", String(n));
    return n;
  }
  [status, search].concat(evals).forEach(function (el) {
    el.addEventListener("input", apply);
    el.addEventListener("change", apply);
  });
  // Set the filters (status, text, {eval name: "pass" | "fail" | "none"}) and apply them.
  window.konstructFilter = function (f) {
    status.value = f.status || "";
    search.value = f.text || "";
    evals.forEach(function (e) {
      e.value = (f.evals || {})[e.getAttribute("data-name")] || "";
    });
    return apply();
  };
  apply();
  if (location.hash === "#selftest") {
    var out = {rows: rows.length, all: window.konstructFilter({}), status: {}, evals: {}};
    ["ok", "failed", "pending"].forEach(function (s) {
      out.status[s] = window.konstructFilter({status: s});
    });
    evals.forEach(function (e) {
      var name = e.getAttribute("data-name"), counts = {};
      ["pass", "fail", "none"].forEach(function (v) {
        var f = {evals: {}}; f.evals[name] = v; counts[v] = window.konstructFilter(f);
      });
      out.evals[name] = counts;
    });
    if (rows.length) {
      out.text_query = rows[rows.length - 1].cells[1].textContent;
      out.text = window.konstructFilter({text: out.text_query});
    }
    window.konstructFilter({});
    var pre = document.createElement("pre");
    pre.id = "selftest";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
})();
"""


def _money(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6f}" if abs(value) < 0.01 else f"{value:,.4f}"


def _unknown(count: int) -> str:
    return f", {count:,} of unknown price" if count else ""


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def _plot_or_note(svg: str | None, note: str) -> str:
    return svg if svg is not None else f'<p class="note">{_e(note)}</p>'


def _mark(flag: bool | None) -> str:
    return "none" if flag is None else "pass" if flag else "fail"


def _item_row(item: ItemResult, names: Sequence[str], has_cost: bool) -> str:
    cells = [f'<td class="n">{item.seq}</td>', f'<td class="s">{_e(item.item_id)}</td>']
    cells.append(f"<td>{_e(item.status)}</td>")
    attrs = [f'data-status="{_e(item.status)}"']
    for index, name in enumerate(names):
        flag = passed(item, name)
        score = score_of(item, name)
        mark = _mark(flag)
        attrs.append(f'data-e{index}="{mark}"')
        text = "" if score is None else f"{score:g}"
        cells.append(f'<td class="n {mark}">{_e(text)}</td>')
    cells.append(
        f'<td class="n">{_fmt(item.latency_ms, 0) if item.latency_ms is not None else ""}</td>'
    )
    tokens = item.prompt_tokens + item.completion_tokens
    cells.append(f'<td class="n">{tokens or ""}</td>')
    cells.append(f'<td class="n">{item.attempt or ""}</td>')
    if has_cost:
        cost = "" if item.cost_usd is None else f"{item.cost_usd:.6f}"
        cells.append(f'<td class="n">{cost}</td>')
    expected = (
        ""
        if item.expected is None
        else (item.expected if isinstance(item.expected, str) else json.dumps(item.expected))
    )
    cells.append(f'<td class="t s">{_e(_clip(item.input, _INPUT_CHARS))}</td>')
    cells.append(f'<td class="t s">{_e(_clip(expected, _INPUT_CHARS))}</td>')
    answer = (
        item.output
        if item.status == "ok"
        else (
            f"{item.error_kind or 'error'}: {item.error or ''}" if item.status == "failed" else ""
        )
    )
    shown = _e(_clip(answer, _OUTPUT_CHARS))
    if item.transcript:
        # An agent's item: its transcript, a click away (`experiments show EXP ITEM`).
        told = Transcript.model_validate(item.transcript).render()
        shown = (
            f'<details class="transcript" id="t-{_e(item.item_id)}"><summary>{shown}</summary>'
            f"<pre>{_e(told)}</pre></details>"
        )
    cells.append(f'<td class="t s">{shown}</td>')
    css = f' class="st-{_e(item.status)}"' if item.status != "ok" else ""
    return f"<tr{css} {' '.join(attrs)}>{''.join(cells)}</tr>"


def _items_section(exp: ExperimentData, names: Sequence[str], max_rows: int) -> str:
    rows = exp.items[:max_rows]
    head = ['<th class="n">#</th>', "<th>item</th>", "<th>status</th>"]
    head += [f'<th class="n">{_e(n)}</th>' for n in names]
    head += ['<th class="n">ms</th>', '<th class="n">tokens</th>', '<th class="n">attempt</th>']
    if exp.has_cost:
        head.append('<th class="n">USD</th>')
    head += ["<th>input</th>", "<th>expected</th>", "<th>output / error</th>"]
    selects = [
        '<label>status <select id="f-status"><option value="">any</option>'
        '<option value="ok">ok</option><option value="failed">failed</option>'
        '<option value="pending">pending</option></select></label>'
    ]
    for index, name in enumerate(names):
        selects.append(
            f'<label>{_e(name)} <select data-eval="{index}" data-name="{_e(name)}">'
            '<option value="">any</option><option value="pass">pass</option>'
            '<option value="fail">fail</option><option value="none">not scored</option>'
            "</select></label>"
        )
    selects.append(
        '<label>search <input id="f-text" type="search" placeholder="id, input, expected,'
        ' output"></label>'
    )
    cap = ""
    if len(exp.items) > max_rows:
        cap = (
            f'<p class="note" id="rows-capped">The table holds the first {max_rows:,} of'
            f" {len(exp.items):,} items in dataset order (the filters search those); the"
            " summary and the plots cover every item. `konstruct experiments show EXP --json`"
            " prints them all.</p>"
        )
    body = "\n".join(_item_row(i, names, exp.has_cost) for i in rows)
    return (
        '<section id="items"><h2>Items</h2>'
        f'<div id="filters">{"".join(selects)}'
        f'<span class="muted"><span id="shown">{len(rows)}</span> of {len(rows)} rows'
        "</span></div>"
        f"{cap}"
        f'<p class="note">Inputs and expected answers are cut at {_INPUT_CHARS} characters,'
        f" outputs at {_OUTPUT_CHARS}.</p>"
        f'<div id="items-wrap"><table id="items-table"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div></section>"
    )


def _summary_section(exp: ExperimentData) -> str:
    counts = side(exp)
    ops = operations(exp)
    lat = [i.latency_ms for i in exp.items if i.latency_ms is not None]
    p99 = percentile(lat, 99)
    cards = [
        _card(exp.status, "status"),
        _card(f"{exp.total:,}", "items"),
        _card(f"{counts.ok:,}", "ok"),
        _card(f"{counts.failed:,}", "failed"),
        _card(f"{counts.pending:,}", "without a result"),
        _card(_fmt(exp.duration_s, 1, " s"), "duration"),
        _card(
            f"{ops.total_tokens:,}",
            f"tokens ({ops.prompt_tokens:,} in, {ops.completion_tokens:,} out)",
        ),
        _card(_money(ops.cost_usd), "cost (USD)" + _unknown(ops.cost_unknown)),
        _card(
            f"{_fmt(ops.latency_p50_ms, 0)} / {_fmt(ops.latency_p95_ms, 0)} / {_fmt(p99, 0)}",
            "latency p50 / p95 / p99 (ms)",
        ),
        _card(f"{exp.throttled:,}", "429s (retried)"),
        _card(f"{exp.call_failures:,}", "call failures (retried)"),
    ]
    cached = [i.cached for i in exp.items if i.cached is not None]
    if cached:
        cards.append(_card(f"{sum(cached):,}", "answered from the cache"))
    rows = []
    for s in eval_stats(exp):
        mean = "n/a" if s.mean is None else f"{s.mean:.4f}"
        if s.mean is not None and s.standard_error is not None:
            mean += f" \u00b1 {s.standard_error:.4f}"
        rate = "n/a" if s.pass_rate is None else f"{s.pass_rate:.1%}"
        rows.append(
            f"<tr><td>{_e(s.name)}</td><td>{_e(s.kind)}</td><td class='n'>{s.scored:,}</td>"
            f"<td class='n'>{_e(mean)}</td><td class='n'>{_e(rate)}</td></tr>"
        )
    errors: dict[str, int] = {}
    for i in exp.items:
        if i.status == "failed":
            errors[i.error_kind or "unknown"] = errors.get(i.error_kind or "unknown", 0) + 1
    error_note = (
        "<p>Failed items by error kind: "
        + ", ".join(f"{_e(k)} {v:,}" for k, v in sorted(errors.items()))
        + "</p>"
        if errors
        else ""
    )
    evals_table = (
        "<table id='evals'><thead><tr><th>eval</th><th>kind</th><th class='n'>scored</th>"
        "<th class='n'>mean \u00b1 standard error</th><th class='n'>pass rate</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p class='note'>The experiment has no evals.</p>"
    )
    return (
        f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>'
        f"{evals_table}{error_note}"
        '<p class="note">Mean over the items with a score (failed and pending items have none);'
        " standard error = sample standard deviation / \u221an. Pass: the eval's stored"
        " <code>passed</code> flag (score \u2265 0.5 when an entry has none).</p></section>"
    )


def render_report(exp: ExperimentData, *, max_rows: int = DEFAULT_MAX_ROWS) -> str:
    """The report page of one experiment."""
    names = exp.eval_names()
    spans = [i.finished_s for i in exp.items if i.finished_s is not None]
    recorded = exp.retry_seconds is not None
    spans += [r.at_s for r in exp.retry_seconds or ()]
    width = bucket_width(max(spans) if spans else 1.0)
    buckets = timeline(exp.items, width, exp.retry_seconds or ())
    title = f"Experiment {exp.experiment_id}"
    when = f"created {exp.created_at}" + (
        f", completed {exp.completed_at}" if exp.completed_at else ", not completed"
    )
    if recorded:
        throughput_note = (
            "Results per second by the time each was stored (ok and failed items); below,"
            " the 429s and failed provider calls (each retried) by the second they"
            " happened. They add up to the totals above."
        )
    else:
        throughput_note = (
            "Results per second by the time each was stored (ok and failed items). This"
            " experiment counted its 429s before they were recorded per second (total"
            " above), so the lower plot shows the extra attempts (429s and call failures"
            " that Temporal retried) of the items stored in each bucket, at the time the"
            " item finally completed."
        )
    cost_svg = cost_plot(buckets, width) if exp.has_cost else None
    if cost_svg is not None:
        cost = cost_svg + (
            '<p class="note">Cumulative cost of the task calls and their judges by the time'
            " each result was stored (a result of unknown price counts 0).</p>"
        )
    elif exp.has_cost:
        cost = (
            '<p class="note">Every stored cost is 0 (no result yet, cached answers, or'
            " prices unknown).</p>"
        )
    else:
        cost = (
            '<p class="note">n/a: the results carry no cost (no <code>cost_usd</code> column).</p>'
        )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} \u2014 Konstruct report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>",
        f'<p class="muted">{_e(exp.name)} \u00b7 tenant {_e(exp.tenant_id)} \u00b7 {_e(when)}</p>'
        "</header>",
        _summary_section(exp),
        '<section id="scores"><h2>Score distribution</h2>',
        _plot_or_note(score_plot(exp, names), "No item has a score yet."),
        "</section>",
        '<section id="latency"><h2>Latency</h2>',
        _plot_or_note(latency_plot(exp), "No result has a latency yet."),
        "</section>",
        '<section id="throughput"><h2>Throughput and 429s over time</h2>',
        _plot_or_note(
            throughput_plot(buckets, width, recorded=recorded), "No result has been stored yet."
        ),
        f'<p class="note">{_e(throughput_note)}</p></section>',
        f'<section id="cost"><h2>Cost</h2>{cost}</section>',
        _items_section(exp, names, max_rows),
        f"<script>{_JS}</script>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)
