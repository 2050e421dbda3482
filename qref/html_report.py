"""The JSON report (schema ``qref-report/2``) as one self-contained HTML page (``--html FILE``).

The page needs nothing but itself: CSS inline, the plots inline SVG, no script, no font, no
image, no link to anything outside the file (it is read from CI artifacts, often offline).
Every string from the document is escaped.  Colour only repeats what words and marker shapes
already say, so the page also reads in print, in grey, and to a screen reader.

It shows the header facts (converter, environment), the counts per status, the conformance
table (one row per family x property), and for each failing test: its reason, the first
diverging quantize point, a plot of the worst error in LSB at each point in graph order
against the allowed tolerance, the points table, and the shrunk model as a standalone script.

Stdlib only; imports neither torch nor hypothesis.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable

__all__ = ["render", "write"]

# Worst first, as in qref.report.STATUSES (repeated so the page also renders documents written
# by another qref version; unknown statuses are shown after these).
STATUSES = ("failed", "not exercised", "not run", "xfailed", "xpassed", "skipped", "passed")

# Colours, named here because the browser test looks for them in a screenshot.
TABLE_HEADER_RGB = (0x24, 0x3B, 0x53)
OVER_TOLERANCE_RGB = (0xC8, 0x1E, 0x1E)
WITHIN_TOLERANCE_RGB = (0x1F, 0x6F, 0xB4)
TOLERANCE_LINE_RGB = (0xE0, 0x8E, 0x0B)
FIRST_DIVERGENCE_RGB = (0xFF, 0xE3, 0x8A)
NOT_COMPARED_RGB = (0x6B, 0x6B, 0x6B)
MISSING_RGB = (0x7A, 0x3E, 0x9D)
PLOT_BACKGROUND_RGB = (0xFB, 0xFB, 0xF7)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def write(document: dict, path: str | Path) -> Path:
    """Writes :func:`render`'s page to ``path`` (UTF-8; parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(document), encoding="utf-8")
    return path


def render(document: dict) -> str:
    """The whole page for a ``qref-report/2`` or ``/3`` document, as a string.

    Tolerates absent optional fields (the schema leaves empty ones out) and failing tests
    without a ``divergence`` or a ``reproducer``; never reads files or the network.
    """
    failing = [t for t in document.get("tests") or [] if t.get("status") == "failed"]
    anchors = {t.get("nodeid"): f"failure-{i}" for i, t in enumerate(failing, start=1)}
    body = "\n".join(
        [
            _header(document),
            _summary(document),
            _collection_errors(document.get("collection_errors") or []),
            _conformance_table(document.get("properties") or [], anchors),
            _failures(failing, anchors),
            _coverage(document.get("coverage")),
            _expectations(document.get("expectations")),
        ]
    )
    title = "qref report"
    target = (document.get("converter") or {}).get("target")
    if target:
        title += f": {target}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# --- small helpers -------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escaped text of ``value`` ("" for None): every document string goes through here."""
    return "" if value is None else html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite or infinite float, or None for what cannot be plotted (null, NaN, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _lsb_text(value: Any) -> str:
    """Like the terminal table: ``3``, ``0.5``, ``inf``; "" for none; ``NaN`` kept visible."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.0f}" if number.is_integer() else f"{number:.3g}"


def _status_order(status: str) -> int:
    return STATUSES.index(status) if status in STATUSES else len(STATUSES)


def _status_badge(status: str | None) -> str:
    # The word is the information; the class only tints it.
    status = status or "unknown"
    css = "status-" + "-".join(status.split())
    return f'<span class="status {_e(css)}">{_e(status)}</span>'


def _definition_list(pairs: Iterable[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_fact(v))}</dd>" for k, v in pairs)
    return f'<dl class="facts">{items}</dl>'


def _fact(value: Any) -> str:
    if value is None:
        return "(not recorded)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "none"
    return str(value)


# --- header, summary, table ------------------------------------------------------------------


def _header(document: dict) -> str:
    converter = document.get("converter") or {}
    env = document.get("environment") or {}
    verdict = "every property holds" if document.get("all_hold") else "NOT every property holds"
    verdict_css = "verdict-hold" if document.get("all_hold") else "verdict-fail"
    converter_facts = [
        ("target", converter.get("target")),
        ("flow", converter.get("flow")),
        ("callable", converter.get("callable")),
        ("accepted keywords", converter.get("accepted")),
    ]
    if converter.get("not_exercised"):
        converter_facts.append(("not exercised (not accepted)", converter.get("not_exercised")))
    environment_facts = [
        ("torch", env.get("torch")),
        ("torchao", env.get("torchao")),
        ("qref", env.get("qref")),
        ("python", env.get("python")),
        ("platform", env.get("platform")),
        ("engines", env.get("engines")),
        ("engines available", env.get("engines_available")),
        ("profile", env.get("profile")),
        ("seed", env.get("seed")),
        ("timeout (s)", env.get("timeout")),
        ("example database", env.get("example_database")),
    ]
    return (
        "<header>\n"
        f"<h1>qref conformance report</h1>\n"
        f'<p class="verdict {verdict_css}"><strong>{_e(verdict)}</strong> '
        f"(pytest exit status {_e(document.get('exit_status'))}; schema {_e(document.get('schema'))})</p>\n"
        '<div class="fact-columns">\n'
        f"<section><h2>Converter</h2>{_definition_list(converter_facts)}</section>\n"
        f"<section><h2>Environment</h2>{_definition_list(environment_facts)}</section>\n"
        "</div>\n</header>"
    )


def _summary(document: dict) -> str:
    counts = document.get("counts") or {}
    statuses = sorted(counts, key=_status_order)
    cells = "".join(
        f'<tr class="{"zero" if not counts[s] else ""}"><th scope="row">{_status_badge(s)}</th>'
        f'<td class="num">{_e(counts[s])}</td></tr>'
        for s in statuses
    )
    total = sum(v for v in counts.values() if isinstance(v, int))
    return (
        '<section id="summary"><h2>Tests per status</h2>\n'
        f'<table class="summary"><thead><tr><th scope="col">status</th><th scope="col">tests</th></tr></thead>'
        f"<tbody>{cells}</tbody>"
        f'<tfoot><tr><th scope="row">total</th><td class="num">{_e(total)}</td></tr></tfoot></table>\n'
        "</section>"
    )


def _collection_errors(errors: list[dict]) -> str:
    if not errors:
        return ""
    items = "".join(f"<li><code>{_e(e.get('nodeid'))}</code>: {_e(e.get('error'))}</li>" for e in errors)
    return (
        '<section id="collection-errors"><h2>Not checked: property modules that could not be imported</h2>'
        f"<ul>{items}</ul></section>"
    )


def _compared_text(compared: Any) -> str:
    if not isinstance(compared, dict):
        return ""
    return f"{compared.get('compared', '?')}/{compared.get('drawn', '?')}"


def _causes_list(not_compared: dict | None) -> str:
    """Why examples were not compared, most frequent first."""
    if not not_compared:
        return ""
    causes = sorted(not_compared.items(), key=lambda kv: (-kv[1] if isinstance(kv[1], int) else 0, str(kv[0])))
    items = "".join(f"<li>{_e(cause)}: {_e(n)}</li>" for cause, n in causes)
    return f'<div class="causes">examples not compared, because:<ul>{items}</ul></div>'


def _conformance_table(properties: list[dict], anchors: dict) -> str:
    if not properties:
        return '<section id="conformance"><h2>Conformance</h2><p>(no qref properties ran)</p></section>'
    rows = []
    previous_family = None
    for row in properties:
        family = row.get("family")
        # the family is named once, as in the terminal table: the eye groups by it
        family_cell = _e(family) if family != previous_family else ""
        previous_family = family
        status = row.get("status")
        links = [anchors[n] for n in row.get("tests") or [] if n in anchors]
        see = "".join(f' <a href="#{a}">details</a>' for a in links[:1])
        if len(links) > 1:
            see += f" ({len(links)} failing tests)"
        counts = row.get("counts") or {}
        count_text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: _status_order(kv[0])))
        rows.append(
            f'<tr class="row-{_e("-".join((status or "unknown").split()))}">'
            f'<td class="family">{family_cell}</td>'
            f'<td class="property">{_e(row.get("property"))}</td>'
            f'<td class="num">{_e(_lsb_text(row.get("max_lsb")))}</td>'
            f'<td class="num">{_e(_compared_text(row.get("compared")))}</td>'
            f'<td>{_status_badge(status)}<div class="counts">{_e(count_text)}</div></td>'
            f'<td class="reason">{_e(row.get("reason"))}{see}{_causes_list(row.get("not_compared"))}</td>'
            "</tr>"
        )
    return (
        '<section id="conformance"><h2>Conformance</h2>\n'
        '<table class="conformance"><thead><tr>'
        '<th scope="col">family</th><th scope="col">property</th><th scope="col">worst LSB</th>'
        '<th scope="col">compared/drawn</th><th scope="col">status</th><th scope="col">reason</th>'
        "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n</section>"
    )


def _coverage(coverage: dict | None) -> str:
    """Every combination the compared examples covered, and the known values never compared."""
    if not coverage:
        return ""
    axes = coverage.get("axes") or []
    head = "".join(f"<th>{_e(a)}</th>" for a in axes) + "<th>examples</th>"
    rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in c) + "</tr>"
                   for c in coverage.get("combinations") or [])
    never = coverage.get("never_compared") or {}
    gaps = "".join(f"<li>{_e(axis)}: {_e(', '.join(values))}</li>" for axis, values in never.items())
    required = coverage.get("required_missing") or []
    text = (f'<p>{_status_badge("failed")} required by --coverage-at-least but never compared: '
             f'{_e(", ".join(required))}</p>'
            if required else "")
    text += f"<p>Known to the suite but never compared in this run:</p><ul>{gaps}</ul>" if gaps else ""
    return ('<section id="coverage"><h2>Coverage</h2>' + text
            + f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>")


def _expectations(expectations: dict | None) -> str:
    if not expectations:
        return ""
    unmatched = expectations.get("unmatched") or []
    items = "".join(
        f"<li><code>{_e(u.get('test'))}</code>: {_e(u.get('reason'))}</li>" for u in unmatched if isinstance(u, dict)
    )
    text = (
        f"<p>file <code>{_e(expectations.get('file'))}</code>, "
        f"{len(expectations.get('entries') or [])} entries"
        f"{' (reported as skips)' if expectations.get('as_skip') else ''}.</p>"
    )
    if items:
        text += f"<p>Entries that matched no test:</p><ul>{items}</ul>"
    return f'<section id="expectations"><h2>Expectations</h2>{text}</section>'


# --- failures ----------------------------------------------------------------------------------


def _failures(failing: list[dict], anchors: dict) -> str:
    if not failing:
        return '<section id="failures"><h2>Failing properties</h2><p>None.</p></section>'
    parts = [_failure(test, anchors[test.get("nodeid")]) for test in failing]
    return '<section id="failures"><h2>Failing properties</h2>\n' + "\n".join(parts) + "\n</section>"


def _failure(test: dict, anchor: str) -> str:
    facts = [
        ("family", test.get("family")),
        ("property", test.get("property")),
        ("tier", test.get("tier")),
        ("flow", test.get("flow")),
        ("worst LSB", _lsb_text(test.get("max_lsb")) or None),
        ("worst LSB at", test.get("max_lsb_where")),
        ("examples compared/drawn", f"{test.get('compared', 0)}/{test['drawn']}" if "drawn" in test else None),
        ("reproducer directory", test.get("artifact")),
    ]
    facts = [(k, v) for k, v in facts if v is not None]
    notes = "".join(f"<li>{_e(n)}</li>" for n in test.get("notes") or [])
    divergence = test.get("divergence")
    return (
        f'<article class="failure" id="{anchor}">\n'
        f"<h3>{_status_badge(test.get('status'))} <code>{_e(test.get('nodeid'))}</code></h3>\n"
        f'<p class="reason">{_e(test.get("reason"))}</p>\n'
        f"{_definition_list(facts)}\n"
        + (f"<h4>Notes</h4><ul>{notes}</ul>\n" if notes else "")
        + (_divergence(divergence) if isinstance(divergence, dict) else
           "<p>No point-by-point comparison was recorded for this test.</p>\n")
        + _causes_list(test.get("not_compared"))
        + _reproducer(test.get("reproducer"))
        + "</article>"
    )


def _point_status(point: dict, missing: set) -> str:
    """What happened at a point, in words shared by the plot's tooltips and the points table."""
    if point.get("point") in missing:
        return "missing"
    lsb = _number(point.get("lsb"))
    if lsb is None:
        return "not comparable" if point.get("ok", True) else "differs (not comparable in LSB)"
    return "within tolerance" if point.get("ok", True) else "over tolerance"


def _plotted_points(divergence: dict) -> list[dict]:
    """The points in graph order, with missing points the list does not carry appended (their
    place in the graph is unknown): every point of the reference gets an x position."""
    points = [p for p in divergence.get("points") or [] if isinstance(p, dict)]
    listed = {p.get("point") for p in points}
    points += [{"point": key, "kind": None, "node": None, "lsb": None, "allowed": None, "ok": False}
               for key in divergence.get("missing") or [] if key not in listed]
    return points


def _divergence(divergence: dict) -> str:
    points = _plotted_points(divergence)
    missing = set(divergence.get("missing") or [])
    first = divergence.get("first")
    by_key = {p.get("point"): p for p in points}
    if first is None:
        first_text = "none recorded (every point agreed)"
    elif first in by_key:
        p = by_key[first]
        first_text = (f"<code>{_e(first)}</code> ({_e(p.get('kind') or 'point')} at node "
                      f"<code>{_e(p.get('node'))}</code>): {_e(_point_status(p, missing))}, "
                      f"{_e(_lsb_text(p.get('lsb')) or 'no')} LSB, {_e(p.get('allowed'))} allowed")
    elif first in (divergence.get("extra") or []):
        first_text = f"<code>{_e(first)}</code> (a point only the candidate quantizes)"
    else:
        first_text = f"<code>{_e(first)}</code>"
    extra = divergence.get("extra") or []
    extra_text = ("<p>Points only the candidate quantizes (extra): "
                  + ", ".join(f"<code>{_e(k)}</code>" for k in extra) + "</p>\n") if extra else ""
    missing_text = ("<p>Points of the reference the candidate does not quantize (missing): "
                    + ", ".join(f"<code>{_e(k)}</code>" for k in sorted(missing)) + "</p>\n") if missing else ""
    return (
        f'<p class="first-divergence"><strong>First divergence:</strong> {first_text}</p>\n'
        + _plot(points, missing, first)
        + missing_text
        + extra_text
        + _points_table(points, missing, first)
    )


def _points_table(points: list[dict], missing: set, first: str | None) -> str:
    rows = []
    for i, p in enumerate(points, start=1):
        status = _point_status(p, missing)
        css = "first" if p.get("point") == first else ""
        mark = " (first divergence)" if p.get("point") == first else ""
        rows.append(
            f'<tr class="{css}"><td class="num">{i}</td><td><code>{_e(p.get("point"))}</code></td>'
            f'<td>{_e(p.get("kind"))}</td><td><code>{_e(p.get("node"))}</code></td>'
            f'<td class="num">{_e(_lsb_text(p.get("lsb")))}</td><td class="num">{_e(p.get("allowed"))}</td>'
            f"<td>{_e(status + mark)}</td></tr>"
        )
    # open when short: a long model's table would bury the next failure
    opened = " open" if len(points) <= 12 else ""
    return (
        f"<details{opened}><summary>Every quantize point ({len(points)})</summary>\n"
        '<table class="points"><thead><tr><th scope="col">#</th><th scope="col">point</th>'
        '<th scope="col">kind</th><th scope="col">reference node</th><th scope="col">worst LSB</th>'
        '<th scope="col">allowed</th><th scope="col">status</th></tr></thead>\n<tbody>'
        + "".join(rows)
        + "</tbody></table></details>\n"
    )


def _reproducer(reproducer: Any) -> str:
    if not isinstance(reproducer, dict) or not reproducer.get("script"):
        return "<p>No reproducer script was recorded for this test.</p>\n"
    tensors = reproducer.get("tensors") or {}
    tensor_items = "".join(
        f"<li><code>{_e(name)}</code>: {_e(meta.get('dtype'))} {_e(meta.get('shape'))}</li>"
        if isinstance(meta, dict) else f"<li><code>{_e(name)}</code></li>"
        for name, meta in tensors.items()
    )
    tensor_text = f"<p>Tensors it loads from <code>inputs.pt</code>:</p><ul>{tensor_items}</ul>\n" if tensors else ""
    return (
        "<h4>The shrunk model, as a standalone script</h4>\n"
        f'<pre class="script"><code>{_e(reproducer["script"])}</code></pre>\n' + tensor_text
    )


# --- the plot ----------------------------------------------------------------------------------

_PLOT_WIDTH, _PLOT_HEIGHT = 960, 440
_LEFT, _RIGHT, _TOP = 64, 16, 46
_DIVERGENCE_LABEL_Y = 14  # above the lane of infinite values, so the two never overprint
_INFINITE_Y = _TOP - 14
_AXIS_BOTTOM = 248  # y of the LSB axis' zero; below it, the lanes for points without a value
_NOT_COMPARABLE_LANE = _AXIS_BOTTOM + 22
_MISSING_LANE = _AXIS_BOTTOM + 44
_LABELS_TOP = _AXIS_BOTTOM + 62
_MAX_LABELS = 10
_LABEL_CHARS = 26
# 1-3-10 steps: readable tick values on a log-like axis
_TICKS = [0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]


def _scale_top(points: list[dict]) -> float:
    """The largest tick the plot's axis needs: it covers every finite LSB and every tolerance."""
    values = [_number(p.get(k)) for p in points for k in ("lsb", "allowed")]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    largest = max(finite, default=1.0)
    for tick in _TICKS[1:]:
        if tick >= largest:
            return float(tick)
    return largest


def _y(value: float, top: float) -> float:
    """Pixel y of an LSB value: log(1 + v), so 0, 1 and 200 LSB are all visible on one axis.
    Infinite values (NaN/inf outputs) sit just above the axis' top."""
    if math.isinf(value):
        return _INFINITE_Y
    fraction = math.log1p(max(value, 0.0)) / math.log1p(top)
    return _AXIS_BOTTOM - fraction * (_AXIS_BOTTOM - _TOP)


def _label_indices(points: list[dict], first: str | None) -> list[int]:
    """Which points get an x label: every one when few; else the first, the last, the first
    divergence, the worst, and evenly spaced others, up to ``_MAX_LABELS``, kept apart so that
    they do not overprint."""
    n = len(points)
    if n <= _MAX_LABELS:
        return list(range(n))
    chosen = {0, n - 1}
    chosen |= {i for i, p in enumerate(points) if p.get("point") == first}
    numeric = [(v, -i) for i, p in enumerate(points) if (v := _number(p.get("lsb"))) is not None]
    if numeric:
        chosen.add(-max(numeric)[1])  # the earliest of the worst
    gap = (n - 1) / (_MAX_LABELS - 1)
    for k in range(1, _MAX_LABELS - 1):
        i = round(k * gap)
        if len(chosen) < _MAX_LABELS and all(abs(i - j) >= gap / 2 for j in chosen):
            chosen.add(i)
    return sorted(chosen)


def _short(text: str) -> str:
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "\u2026"


def _marker(kind: str, x: float, y: float, tooltip: str) -> str:
    """One point's marker: a distinct shape per kind, so colour is never the only cue."""
    title = f"<title>{_e(tooltip)}</title>"
    if kind == "over tolerance":  # filled triangle, pointing up: "too high"
        return (f'<path class="marker-over" d="M{x:.1f},{y - 8:.1f} L{x + 7.5:.1f},{y + 5:.1f} '
                f'L{x - 7.5:.1f},{y + 5:.1f} Z" fill="{_hex(OVER_TOLERANCE_RGB)}">{title}</path>')
    if kind == "within tolerance":  # filled circle
        return (f'<circle class="marker-ok" cx="{x:.1f}" cy="{y:.1f}" r="4.5" '
                f'fill="{_hex(WITHIN_TOLERANCE_RGB)}">{title}</circle>')
    if kind == "missing":  # a cross: "nothing there"
        return (f'<path class="marker-missing" d="M{x - 5:.1f},{y - 5:.1f} L{x + 5:.1f},{y + 5:.1f} '
                f'M{x - 5:.1f},{y + 5:.1f} L{x + 5:.1f},{y - 5:.1f}" stroke="{_hex(MISSING_RGB)}" '
                f'stroke-width="2.5" fill="none">{title}</path>')
    # not comparable in LSB: a hollow square; its outline is red when the point failed anyway
    stroke = _hex(OVER_TOLERANCE_RGB) if kind.startswith("differs") else _hex(NOT_COMPARED_RGB)
    return (f'<rect class="marker-not-comparable" x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" '
            f'fill="white" stroke="{stroke}" stroke-width="2">{title}</rect>')


def _plot(points: list[dict], missing: set, first: str | None) -> str:
    """The inline SVG of one failure: x = the points in graph order, y = their worst LSB."""
    if not points:
        return "<p>(no quantize points recorded)</p>\n"
    n = len(points)
    top = _scale_top(points)
    step = (_PLOT_WIDTH - _LEFT - _RIGHT) / n

    def x_of(i: int) -> float:
        return _LEFT + (i + 0.5) * step

    # drawing order matters: what comes later is drawn over what came before
    parts = [
        f'<rect class="plot-area" x="{_LEFT}" y="{_TOP}" width="{_PLOT_WIDTH - _RIGHT - _LEFT}" '
        f'height="{_AXIS_BOTTOM - _TOP}" fill="{_hex(PLOT_BACKGROUND_RGB)}" stroke="#999"/>',
        _first_divergence_band(points, first, x_of, step),
        _axes(top),
        _tolerance_line(points, top, x_of, step),
        _trend_line(points, top, x_of),
        _markers(points, missing, top, x_of),
        _x_labels(points, first, x_of),
        _legend(),
    ]
    over = sum(1 for p in points if _point_status(p, missing) == "over tolerance")
    description = (f"{n} quantize points in graph order; {over} over tolerance; "
                   f"first divergence: {first if first is not None else 'none'}")
    return (
        f'<figure class="plot"><svg role="img" '
        f'viewBox="0 0 {_PLOT_WIDTH} {_PLOT_HEIGHT}" width="{_PLOT_WIDTH}" height="{_PLOT_HEIGHT}">'
        f"<title>worst error in LSB at each quantize point</title><desc>{_e(description)}</desc>"
        + "".join(parts)
        + "</svg>\n<figcaption>Worst error in LSB at each quantize point, in graph order (log scale: "
        "log(1 + LSB)); the dashed line is the tolerance allowed at each point. "
        "Points without a value in LSB are in the <em>n/c</em> lane, missing points in the "
        "<em>missing</em> lane; hover a marker for its point.</figcaption></figure>\n"
    )


def _first_divergence_band(points: list[dict], first: str | None, x_of, step: float) -> str:
    """A tinted column behind the first diverging point, from its label down to the lanes."""
    index = next((i for i, p in enumerate(points) if first is not None and p.get("point") == first), None)
    if index is None:
        return ""
    x = x_of(index)
    width = min(max(step * 0.6, 14.0), 48.0)  # wide enough to see, narrow enough to point
    anchor = "end" if x > _PLOT_WIDTH * 0.7 else "start"  # keep the label inside the picture
    return (
        f'<rect class="first-divergence-band" x="{x - width / 2:.1f}" y="{_DIVERGENCE_LABEL_Y + 6}" '
        f'width="{width:.1f}" height="{_MISSING_LANE + 10 - _DIVERGENCE_LABEL_Y - 6}" '
        f'fill="{_hex(FIRST_DIVERGENCE_RGB)}"/>'
        f'<text class="first-divergence-label" x="{x + (-10 if anchor == "end" else 10):.1f}" '
        f'y="{_DIVERGENCE_LABEL_Y}" text-anchor="{anchor}">first divergence: {_e(_short(str(first)))}</text>'
    )


def _axes(top: float) -> str:
    """The y axis' 1-3-10 ticks with light grid lines, its title, and the names of the lanes."""
    parts = []
    for tick in _TICKS:
        if tick > top:
            break
        y = _y(tick, top)
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_PLOT_WIDTH - _RIGHT}" y2="{y:.1f}" stroke="#e2e2e2"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    parts.append(f'<text class="axis-title" transform="translate(14,{(_TOP + _AXIS_BOTTOM) / 2:.0f}) rotate(-90)" '
                 'text-anchor="middle">worst error (LSB)</text>')
    parts.append(f'<text class="lane" x="{_LEFT - 6}" y="{_NOT_COMPARABLE_LANE + 4}" text-anchor="end">n/c</text>')
    parts.append(f'<text class="lane" x="{_LEFT - 6}" y="{_MISSING_LANE + 4}" text-anchor="end">missing</text>')
    return "".join(parts)


def _markers(points: list[dict], missing: set, top: float, x_of) -> str:
    """One marker per point, with a tooltip naming it (``<title>``: no script needed)."""
    parts = []
    for i, p in enumerate(points):
        status = _point_status(p, missing)
        lsb = _number(p.get("lsb"))
        if status == "missing":
            y = _MISSING_LANE
        elif lsb is None:
            y = _NOT_COMPARABLE_LANE
        else:
            y = _y(lsb, top)
        tooltip = (f"#{i + 1} {p.get('point')} ({p.get('kind') or 'point'}, node {p.get('node')}): "
                   f"{_lsb_text(p.get('lsb')) or 'no'} LSB, {p.get('allowed')} allowed, {status}")
        parts.append(_marker(status, x_of(i), y, tooltip))
        if lsb is not None and math.isinf(lsb):
            parts.append(f'<text class="tick" x="{x_of(i) + 9:.1f}" y="{_INFINITE_Y + 4}">inf</text>')
    return "".join(parts)


def _x_labels(points: list[dict], first: str | None, x_of) -> str:
    parts = []
    for i in _label_indices(points, first):
        key = str(points[i].get("point"))
        parts.append(
            f'<text class="x-label" transform="translate({x_of(i):.1f},{_LABELS_TOP}) rotate(35)">'
            f"{_e(_short(key))}<title>{_e(key)}</title></text>"
        )
    return "".join(parts)


def _tolerance_line(points: list[dict], top: float, x_of, step: float) -> str:
    """The allowed LSB as one dashed step line: it may grow with depth, so it is drawn per point
    (a horizontal step over each point, vertical risers between neighbours)."""
    path, previous = [], None
    for i, p in enumerate(points):
        allowed = _number(p.get("allowed"))
        if allowed is None or math.isinf(allowed):
            previous = None  # a gap: no tolerance to draw here
            continue
        y = _y(allowed, top)
        path.append(f"M{x_of(i) - step / 2:.1f},{y:.1f}" if previous is None else f"V{y:.1f}")
        path.append(f"H{x_of(i) + step / 2:.1f}")
        previous = y
    if not path:
        return ""
    return (f'<path class="tolerance" d="{" ".join(path)}" stroke="{_hex(TOLERANCE_LINE_RGB)}" '
            'stroke-width="2.5" stroke-dasharray="7 4" fill="none"/>')


def _trend_line(points: list[dict], top: float, x_of) -> str:
    """A thin line through consecutive points with a finite value (broken where one has none)."""
    runs, run = [], []
    for i, p in enumerate(points):
        lsb = _number(p.get("lsb"))
        if lsb is None or math.isinf(lsb):
            runs.append(run)
            run = []
        else:
            run.append(f"{x_of(i):.1f},{_y(lsb, top):.1f}")
    runs.append(run)
    return "".join(f'<polyline points="{" ".join(r)}" stroke="#9aa5b1" stroke-width="1" fill="none"/>'
                   for r in runs if len(r) > 1)


def _legend() -> str:
    y = _PLOT_HEIGHT - 12
    entries = [("within tolerance", "within tolerance"), ("over tolerance", "over tolerance"),
               ("not comparable", "not comparable in LSB"), ("missing", "missing in the candidate")]
    parts, x = [], _LEFT
    for kind, label in entries:
        parts.append(_marker(kind, x + 6, y - 4, label))
        parts.append(f'<text class="legend" x="{x + 18}" y="{y}">{_e(label)}</text>')
        x += 40 + 7 * len(label)
    parts.append(f'<path d="M{x},{y - 4} H{x + 28}" stroke="{_hex(TOLERANCE_LINE_RGB)}" stroke-width="2.5" '
                 'stroke-dasharray="7 4"/>')
    parts.append(f'<text class="legend" x="{x + 34}" y="{y}">allowed (tolerance)</text>')
    return '<g class="legend">' + "".join(parts) + "</g>"


_CSS = f"""
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1b1b1b;
       background: white; max-width: 1200px; }}
h1 {{ font-size: 1.6rem; margin: 0 0 .3rem; }}
h2 {{ font-size: 1.2rem; margin: 1.4rem 0 .5rem; }}
h3 {{ font-size: 1rem; margin: .2rem 0 .4rem; }}
h4 {{ font-size: .95rem; margin: 1rem 0 .3rem; }}
code, pre {{ font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; }}
.verdict {{ font-size: 1.05rem; padding: .3rem .6rem; border-left: 6px solid; }}
.verdict-hold {{ border-color: #2f7d32; }}
.verdict-fail {{ border-color: #b3261e; }}
.fact-columns {{ display: flex; gap: 3rem; flex-wrap: wrap; }}
dl.facts {{ display: grid; grid-template-columns: max-content auto; gap: .1rem 1rem; margin: 0; }}
dl.facts dt {{ font-weight: 600; }}
dl.facts dd {{ margin: 0; }}
table {{ border-collapse: collapse; font-size: .9rem; }}
th, td {{ border: 1px solid #c9ced6; padding: .25rem .5rem; vertical-align: top; text-align: left; }}
thead th {{ background: {_hex(TABLE_HEADER_RGB)}; color: white; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
td.family {{ font-weight: 600; }}
tr.zero {{ color: #777; }}
table.conformance {{ width: 100%; }}
.status {{ font-weight: 600; padding: 0 .3rem; border-radius: 3px; white-space: nowrap; }}
.status-failed, .status-not-exercised {{ background: #fbdcda; color: #7a1410; }}
.status-not-run {{ background: #f4e3c8; color: #5c3b00; }}
.status-xfailed, .status-skipped {{ background: #e8e8e8; color: #333; }}
.status-xpassed {{ background: #fff0b3; color: #5c4700; }}
.status-passed {{ background: #dcefdc; color: #1d4d1f; }}
.counts {{ font-size: .75rem; color: #555; }}
.causes {{ font-size: .8rem; margin-top: .2rem; }}
.causes ul {{ margin: .1rem 0 0 1.1rem; padding: 0; }}
article.failure {{ border: 1px solid #c9ced6; border-left: 6px solid #b3261e; padding: .6rem 1rem;
                  margin: 1rem 0; }}
p.first-divergence {{ background: {_hex(FIRST_DIVERGENCE_RGB)}40; padding: .3rem .5rem; }}
figure.plot {{ margin: .5rem 0; }}
figure.plot svg {{ max-width: 100%; height: auto; font-size: 12px; overflow: visible; }}  /* long last x label */
figcaption {{ font-size: .8rem; color: #444; max-width: 960px; }}
svg text {{ fill: #222; }}
svg text.x-label {{ font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 11px; }}
svg text.first-divergence-label {{ font-weight: 600; }}
table.points tr.first td {{ background: {_hex(FIRST_DIVERGENCE_RGB)}; font-weight: 600; }}
pre.script {{ background: #f6f8fa; border: 1px solid #d0d7de; padding: .6rem; overflow-x: auto;
             white-space: pre; }}
@media print {{ pre.script {{ white-space: pre-wrap; }} details {{ display: block; }} }}
"""
