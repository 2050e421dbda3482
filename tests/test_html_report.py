"""``qref.html_report``: the JSON report as one self-contained HTML page.

String-level checks (escaping, every row, each failure's code/first divergence/plot, nothing
fetched from outside the file), then the page as a real headless browser renders it: a
screenshot (decoded here with zlib + struct) must show the conformance table's header colour
and the plot's markers where they belong, and the DOM chromium built must hold the rows and
the SVG elements.
"""

from __future__ import annotations

import copy
import html
import json
import math
import re
import shutil
import struct
import subprocess
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qref import html_report

# --- a small, realistic document -------------------------------------------------------------------

REPRO_SCRIPT = '''"""qref reproducer.

model: Sequential(Conv2d(3, 4, 3), ReLU(), Linear(4, 2))
converter: my_pkg.convert:convert_pt2e
"""
import torch


class Model(torch.nn.Module):
    def forward(self, x):
        return torch.relu(self.conv(x)) if x.sum() < 0 and "<b>" != '&amp;' else x


if __name__ == "__main__":
    main()
'''

# In graph order: the first divergence is conv2d (13 LSB where 1 is allowed), then one over
# tolerance further on, a point that is not comparable in LSB, a missing one, and the output.
DIVERGENCE_POINTS = [
    {"point": "x_q", "kind": "activation", "node": "quantize_per_tensor_default", "lsb": 0, "allowed": 0, "ok": True},
    {"point": "conv.weight", "kind": "weight", "node": "dequantize_per_channel", "lsb": 0, "allowed": 0, "ok": True},
    {"point": "conv2d", "kind": "activation", "node": "quantize_per_tensor_1", "lsb": 13, "allowed": 1, "ok": False},
    {"point": "relu", "kind": "activation", "node": "quantize_per_tensor_2", "lsb": 1, "allowed": 2, "ok": True},
    {"point": "linear.weight", "kind": "weight", "node": "dequantize_per_channel_1", "lsb": None, "allowed": 0,
     "ok": True},
    {"point": "linear", "kind": "activation", "node": "quantize_per_tensor_3", "lsb": 40, "allowed": 3, "ok": False},
    {"point": "output[0]", "kind": "output", "node": "output", "lsb": 2.5, "allowed": 3, "ok": True},
]


def make_document() -> dict:
    failing_id = "properties/test_equivalence.py::test_matches_reference[models-pt2e]"
    return {
        "schema": "qref-report/3",
        "converter": {"target": "my_pkg.convert:convert_pt2e", "flow": "pt2e",
                      "callable": "my_pkg.convert.convert_pt2e", "accepted": ["model"],
                      "not_exercised": ["fold_effect"]},
        "environment": {"torch": "2.8.0+cpu", "torchao": "0.13.0", "qref": "0.1.0", "python": "3.11.2",
                        "platform": "Linux-6.1-x86_64", "engines": ["x86", "fbgemm"],
                        "engines_available": ["x86", "fbgemm", "qnnpack"], "profile": "ci", "seed": 1234,
                        "timeout": 600, "example_database": False},
        "exit_status": 1,
        "all_hold": False,
        "counts": {"failed": 1, "not exercised": 1, "not run": 0, "xfailed": 0, "xpassed": 0, "skipped": 0,
                   "passed": 3},
        "collection_errors": [],
        "properties": [
            {"family": "primitives", "property": "quantize_matches_torch", "status": "passed",
             "counts": {"passed": 1}, "max_lsb": 0.0, "compared": {"compared": 50, "drawn": 50},
             "not_compared": {}, "reason": None, "tests": ["properties/test_primitives.py::test_quantize"]},
            {"family": "primitives", "property": "requantize_rounding", "status": "passed",
             "counts": {"passed": 2}, "max_lsb": 1.0, "compared": {"compared": 90, "drawn": 100},
             "not_compared": {"scale below 2**-20": 10}, "reason": None,
             "tests": ["properties/test_primitives.py::test_requantize[a]",
                       "properties/test_primitives.py::test_requantize[b]"]},
            {"family": "equivalence", "property": "matches_reference", "status": "failed",
             "counts": {"failed": 1}, "max_lsb": 40.0, "compared": {"compared": 3, "drawn": 3},
             "not_compared": {}, "reason": "AssertionError: conv2d differs by 13 LSB (1 allowed)",
             "tests": [failing_id]},
            {"family": "folding", "property": "fold_bn_<exact>", "status": "not exercised",
             "counts": {"not exercised": 1}, "max_lsb": None, "compared": {"compared": 0, "drawn": 20},
             "not_compared": {"no BatchNorm after a Conv": 15, "model has no conv & bn": 5},
             "reason": "no example was compared (20 drawn)",
             "tests": ["properties/test_folding.py::test_fold_bn"]},
        ],
        "tests": [
            {"nodeid": "properties/test_primitives.py::test_quantize", "family": "primitives",
             "property": "quantize_matches_torch", "status": "passed", "max_lsb": 0.0, "duration": 0.5,
             "drawn": 50, "compared": 50},
            {"nodeid": "properties/test_primitives.py::test_requantize[a]", "family": "primitives",
             "property": "requantize_rounding", "status": "passed", "max_lsb": 1.0, "duration": 0.2,
             "drawn": 50, "compared": 45, "not_compared": {"scale below 2**-20": 5}},
            {"nodeid": "properties/test_primitives.py::test_requantize[b]", "family": "primitives",
             "property": "requantize_rounding", "status": "passed", "max_lsb": 1.0, "duration": 0.2,
             "drawn": 50, "compared": 45, "not_compared": {"scale below 2**-20": 5}},
            {"nodeid": failing_id, "family": "equivalence", "property": "matches_reference", "tier": "models",
             "flow": "pt2e", "status": "failed", "reason": "AssertionError: conv2d differs by 13 LSB (1 allowed)",
             "max_lsb": 40.0, "max_lsb_where": "linear", "notes": ["isolated: each point fed the reference's ints"],
             "reproducer": {"script": REPRO_SCRIPT,
                            "tensors": {"calibration_0": {"shape": [1, 3, 8, 8], "dtype": "torch.float32"}}},
             "artifact": "qref-artifacts/test_matches_reference-models-pt2e", "duration": 3.1,
             "drawn": 3, "compared": 3,
             "divergence": {"first": "conv2d", "points": copy.deepcopy(DIVERGENCE_POINTS),
                            "missing": ["hardtanh_q"], "extra": ["flatten_q"]}},
            {"nodeid": "properties/test_folding.py::test_fold_bn", "family": "folding",
             "property": "fold_bn_<exact>", "status": "not exercised",
             "reason": "no example was compared (20 drawn)", "duration": 1.0, "drawn": 20, "compared": 0,
             "not_compared": {"no BatchNorm after a Conv": 15, "model has no conv & bn": 5}},
        ],
        "expectations": None,
    }


# --- string-level checks -------------------------------------------------------------------------


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the page's text (entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


def test_render_is_one_html_page_with_the_header_facts():
    page = html_report.render(make_document())
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    text = " ".join(parse(page).text)
    for fact in ("my_pkg.convert:convert_pt2e", "pt2e", "2.8.0+cpu", "0.13.0", "0.1.0", "x86, fbgemm",
                 "x86, fbgemm, qnnpack", "ci", "1234", "fold_effect", "NOT every property holds"):
        assert fact in text, fact


def test_every_row_of_the_conformance_table_with_its_columns():
    page = html_report.render(make_document())
    table = page[page.index('<table class="conformance"'):]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr class=\"row-[^\"]*\">(.*?)</tr>", table, re.S)
    assert len(rows) == len(make_document()["properties"])
    cells = [[re.sub(r"<[^>]+>", " ", c).split() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
             for r in rows]
    by_property = {" ".join(c[1]): c for c in cells}
    assert set(by_property) == {"quantize_matches_torch", "requantize_rounding", "matches_reference",
                                "fold_bn_&lt;exact&gt;"}
    assert by_property["matches_reference"][2] == ["40"]  # worst LSB
    assert by_property["matches_reference"][3] == ["3/3"]  # compared/drawn
    assert by_property["matches_reference"][4][0] == "failed"
    assert by_property["requantize_rounding"][3] == ["90/100"]
    assert by_property["quantize_matches_torch"][4][0] == "passed"
    assert " ".join(by_property["fold_bn_&lt;exact&gt;"][4][:2]) == "not exercised"
    # the not-exercised row names its causes, with their counts
    causes = " ".join(by_property["fold_bn_&lt;exact&gt;"][5])
    assert "no BatchNorm after a Conv: 15" in causes
    assert "model has no conv &amp; bn: 5" in causes
    # the family is named once per group
    assert [c[0] for c in cells] == [["primitives"], [], ["equivalence"], ["folding"]]


def test_summary_counts():
    page = html_report.render(make_document())
    summary = page[page.index('id="summary"'):page.index('id="conformance"')]
    found = dict(re.findall(r'class="status[^"]*">([^<]+)</span></th><td class="num">(\d+)<', summary))
    assert found == {"failed": "1", "not exercised": "1", "not run": "0", "xfailed": "0", "xpassed": "0",
                     "skipped": "0", "passed": "3"}
    assert re.search(r'total</th><td class="num">5<', summary)


def test_a_failing_property_has_its_code_first_divergence_and_plot():
    page = html_report.render(make_document())
    failure = page[page.index('<article class="failure"'):]
    failure = failure[: failure.index("</article>")]
    # the table row links to it
    anchor = re.search(r'<article class="failure" id="([^"]+)"', page).group(1)
    assert f'href="#{anchor}"' in page
    # first divergence, with its node and numbers
    first = re.search(r'<p class="first-divergence">(.*?)</p>', failure, re.S).group(1)
    assert "<code>conv2d</code>" in first and "quantize_per_tensor_1" in first
    assert "over tolerance" in first and "13" in first
    # the reproducer script, escaped but whole
    code = re.search(r'<pre class="script"><code>(.*?)</code></pre>', failure, re.S).group(1)
    assert html.unescape(code) == REPRO_SCRIPT
    # the plot: one marker per point, by what happened there
    svg = failure[failure.index("<svg"): failure.index("</svg>")]
    markers = re.findall(r'class="marker-([a-z-]+)"', svg.split('<g class="legend">')[0])
    assert markers.count("over") == 2  # conv2d and linear
    assert markers.count("ok") == 4  # x_q, conv.weight, relu, output[0]
    assert markers.count("not-comparable") == 1  # linear.weight: lsb null
    assert markers.count("missing") == 1  # hardtanh_q
    assert svg.count('class="first-divergence-band"') == 1
    assert 'class="tolerance"' in svg
    assert "first divergence: conv2d" in svg
    # missing and extra points are named
    assert "hardtanh_q" in failure and "flatten_q" in failure
    assert "isolated: each point fed the reference&#x27;s ints" in failure


def test_every_document_string_is_escaped():
    document = make_document()
    evil = '<script>alert("x")</script>&<img src=x onerror=1>'
    document["converter"]["target"] = evil
    document["environment"]["platform"] = evil
    document["properties"][0]["reason"] = evil
    document["properties"][0]["property"] = evil
    document["properties"][3]["not_compared"] = {evil: 3}
    failing = document["tests"][3]
    failing["nodeid"] = evil
    document["properties"][2]["tests"] = [evil]
    failing["reason"] = evil
    failing["notes"] = [evil]
    failing["divergence"]["first"] = evil
    failing["divergence"]["points"][2]["point"] = evil
    failing["divergence"]["points"][2]["node"] = evil
    failing["divergence"]["missing"] = [evil]
    failing["divergence"]["extra"] = [evil]
    failing["reproducer"]["script"] = evil
    failing["reproducer"]["tensors"] = {evil: {"shape": evil, "dtype": evil}}
    page = html_report.render(document)
    assert "<script" not in page and "<img" not in page
    tags = {tag for tag, _ in parse(page).tags}
    assert not tags & {"script", "img"}
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page


def test_nothing_is_fetched_from_outside_the_file():
    page = html_report.render(make_document())
    elements = parse(page)
    for tag, attrs in elements.tags:
        assert tag not in ("script", "link", "img", "iframe", "object", "embed"), tag
        for name in ("src", "href", "xlink:href", "action", "data"):
            value = attrs.get(name)
            assert value is None or value.startswith("#"), (tag, name, value)
    assert "http://" not in page and "https://" not in page
    assert "url(" not in page and "@import" not in page


def test_absent_optional_fields_and_odd_values_render():
    # a minimal document: what the schema may leave out is left out
    minimal = {"schema": "qref-report/3", "converter": None, "environment": {}, "exit_status": 5,
               "all_hold": False, "counts": {}, "properties": [], "tests": [], "expectations": None}
    page = html_report.render(minimal)
    assert "(no qref properties ran)" in page
    document = make_document()
    failing = document["tests"][3]
    del failing["reproducer"]
    failing["divergence"]["points"][6]["lsb"] = math.inf  # a NaN/inf output
    failing["divergence"]["points"][0]["lsb"] = math.nan
    failing["divergence"]["first"] = "flatten_q"  # an extra point
    page = html_report.render(document)
    assert "No reproducer script was recorded" in page
    assert ">inf<" in page and "NaN" in page
    assert "a point only the candidate quantizes" in page
    del document["tests"][3]["divergence"]
    assert "No point-by-point comparison was recorded" in html_report.render(document)


def test_many_points_label_only_a_few():
    document = make_document()
    points = [{"point": f"layer{i}.q", "kind": "activation", "node": f"q_{i}", "lsb": i % 3,
               "allowed": 2, "ok": True} for i in range(200)]
    points[123].update(lsb=50, ok=False)
    document["tests"][3]["divergence"] = {"first": "layer123.q", "points": points, "missing": [], "extra": []}
    page = html_report.render(document)
    labels = re.findall(r'class="x-label"[^>]*>([^<]+)<title>', page)
    assert 2 < len(labels) <= 10
    assert {"layer0.q", "layer199.q", "layer123.q"} <= set(labels)
    assert "<details><summary>Every quantize point (200)" in page  # long tables start closed


def test_write_creates_the_file(tmp_path):
    path = html_report.write(make_document(), tmp_path / "sub" / "report.html")
    assert path.read_text(encoding="utf-8") == html_report.render(make_document())
    # the document round-trips through JSON as the plugin writes it (inf as Infinity)
    assert html_report.render(json.loads(json.dumps(make_document()))) == html_report.render(make_document())


# --- in a real browser ----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
WINDOW = (1280, 2400)


def _chromium(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               "--hide-scrollbars", "--force-device-scale-factor=1", "--force-color-profile=srgb",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat = 8, []
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position: position + 8])
        chunk = data[position + 8: position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    rows, previous = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], raw[start + 1: start + 1 + stride], previous, channels)
        previous = line
        rows.append(line if channels == 3 else _drop_alpha(line))
    return width, height, rows


def _drop_alpha(line: bytes) -> bytes:
    out = bytearray(len(line) // 4 * 3)
    out[0::3], out[1::3], out[2::3] = line[0::4], line[1::4], line[2::4]
    return bytes(out)


def _unfilter(kind: int, line: bytes, previous: bytes, bpp: int) -> bytes:
    if kind == 0:
        return line
    if kind == 2:  # up: bytewise sum, done on whole rows as big integers without carries
        return _bytewise_add(line, previous)
    out = bytearray(line)
    n = len(out)
    if kind == 1:  # sub
        for i in range(bpp, n):
            out[i] = (out[i] + out[i - bpp]) & 0xFF
    elif kind == 3:  # average
        for i in range(n):
            left = out[i - bpp] if i >= bpp else 0
            out[i] = (out[i] + ((left + previous[i]) >> 1)) & 0xFF
    elif kind == 4:  # paeth
        for i in range(n):
            b = previous[i]
            if i >= bpp:
                a, c = out[i - bpp], previous[i - bpp]
            else:
                a = c = 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    else:
        raise AssertionError(f"PNG filter {kind}")
    return bytes(out)


def _bytewise_add(x: bytes, y: bytes) -> bytes:
    """(x + y) mod 256 byte by byte: add the low 7 bits of every byte (no carry can cross a
    byte), then set each top bit to the xor of the two top bits."""
    n = len(x)
    low = int.from_bytes(b"\x7f" * n, "big")
    high = int.from_bytes(b"\x80" * n, "big")
    a, b = int.from_bytes(x, "big"), int.from_bytes(y, "big")
    return (((a & low) + (b & low)) ^ ((a ^ b) & high)).to_bytes(n, "big")


def blobs(rows: list[bytes], rgb: tuple[int, int, int], slack: int = 2) -> list[tuple[int, int, int, int, int]]:
    """Connected groups of pixels of colour ``rgb`` (8-neighbourhood), each as
    (pixels, x min, y min, x max, y max), top to bottom."""
    r0, g0, b0 = rgb
    pixels = set()
    for y, row in enumerate(rows):
        if not slack and bytes([r0]) not in row:  # a cheap skip of lines without the colour
            continue
        for x in range(0, len(row), 3):
            if abs(row[x] - r0) <= slack and abs(row[x + 1] - g0) <= slack and abs(row[x + 2] - b0) <= slack:
                pixels.add((x // 3, y))
    groups = []
    while pixels:
        stack = [pixels.pop()]
        members = []
        while stack:
            x, y = stack.pop()
            members.append((x, y))
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    if (x + dx, y + dy) in pixels:
                        pixels.remove((x + dx, y + dy))
                        stack.append((x + dx, y + dy))
        xs, ys = [m[0] for m in members], [m[1] for m in members]
        groups.append((len(members), min(xs), min(ys), max(xs), max(ys)))
    return sorted(groups, key=lambda g: (g[2], g[1]))


def wide_lines(rows: list[bytes], rgb: tuple[int, int, int], at_least: float, slack: int = 2) -> list[int]:
    """The y of every screenshot line with at least ``at_least`` pixels of colour ``rgb``."""
    r0, g0, b0 = rgb
    found = []
    for y, row in enumerate(rows):
        n = sum(1 for x in range(0, len(row), 3)
                if abs(row[x] - r0) <= slack and abs(row[x + 1] - g0) <= slack and abs(row[x + 2] - b0) <= slack)
        if n >= at_least:
            found.append(y)
    return found


def _inside(group, box, margin: int = 0) -> bool:
    _, x0, y0, x1, y1 = group
    _, bx0, by0, bx1, by1 = box
    return bx0 - margin <= x0 and x1 <= bx1 + margin and by0 - margin <= y0 and y1 <= by1 + margin


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The test document's page as chromium renders it: (screenshot rows, DOM dump, seconds)."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary (/usr/bin/chromium): install Debian's `apt-get install -y chromium`")
    tmp_path = tmp_path_factory.mktemp("browser")
    page = html_report.write(make_document(), tmp_path / "report.html")
    screenshot = tmp_path / "report.png"
    started = time.monotonic()
    shot = _chromium(tmp_path, f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     page.resolve().as_uri())
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    dom = _chromium(tmp_path, "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    width, height, rows = read_png(screenshot)
    assert (width, height) == WINDOW
    return rows, dom.stdout, time.monotonic() - started


def test_browser_renders_the_table_rows_and_the_svg(rendered):
    _, dom, _ = rendered
    elements = parse(dom)
    tags = [tag for tag, _ in elements.tags]
    # the browser built the conformance table with every row, and the plot as SVG elements
    row_classes = [a.get("class") for t, a in elements.tags if t == "tr" and (a.get("class") or "").startswith("row-")]
    assert row_classes == ["row-passed", "row-passed", "row-failed", "row-not-exercised"]
    assert tags.count("svg") == 1
    marker_classes = [a.get("class") for _, a in elements.tags if (a.get("class") or "").startswith("marker-")]
    # 8 points plus the 4 legend entries
    assert sorted(marker_classes) == sorted(["marker-ok"] * 5 + ["marker-over"] * 3 + ["marker-missing"] * 2
                                            + ["marker-not-comparable"] * 2)
    assert {"polyline", "path", "rect", "circle", "text"} <= set(tags)
    text = " ".join(elements.text)
    for words in ("quantize_matches_torch", "fold_bn_<exact>", "no BatchNorm after a Conv: 15",
                  "first divergence: conv2d", "class Model(torch.nn.Module):"):
        assert words in text, words


def test_screenshot_shows_the_table_and_the_plot(rendered):
    rows, _, seconds = rendered
    assert seconds < 20, f"chromium took {seconds:.1f} s"
    # the conformance table's header: the first band of lines mostly of its colour (the cell
    # borders cut it into blobs; the summary table above is narrow)
    header_lines = wide_lines(rows, html_report.TABLE_HEADER_RGB, 0.6 * WINDOW[0])
    assert len(header_lines) >= 15, header_lines
    band_end = next((a for a, b in zip(header_lines, header_lines[1:]) if b != a + 1), header_lines[-1])
    table_header = (None, None, header_lines[0], None, band_end)
    assert band_end - header_lines[0] >= 15, header_lines
    # the plot's area, below the table: its background, cut into pieces by the grid lines and
    # the first divergence's band
    pieces = [b for b in blobs(rows, html_report.PLOT_BACKGROUND_RGB, slack=0) if b[0] > 2_000]
    assert pieces
    plot = (sum(b[0] for b in pieces), min(b[1] for b in pieces), min(b[2] for b in pieces),
            max(b[3] for b in pieces), max(b[4] for b in pieces))
    assert plot[2] > table_header[4], (plot, table_header)
    assert plot[3] - plot[1] > 600 and plot[4] - plot[2] > 120, plot
    # two over-tolerance triangles in the plot (conv2d, then linear: further right and higher,
    # 40 LSB against 13), and one in the legend below it
    over = blobs(rows, html_report.OVER_TOLERANCE_RGB)
    over = [b for b in over if b[0] >= 20]  # markers, not anti-aliased specks of the text
    in_plot = [b for b in over if _inside(b, plot, margin=12)]
    assert len(in_plot) == 2, over
    conv2d, linear = sorted(in_plot, key=lambda b: b[1])
    assert linear[2] < conv2d[2]
    assert any(b[2] > plot[4] for b in over if b not in in_plot), "legend triangle"
    # the first divergence's band is behind the conv2d triangle, not behind linear's
    # (in pieces too, cut by the grid; the points table's highlighted row has its colour as well)
    pieces = [b for b in blobs(rows, html_report.FIRST_DIVERGENCE_RGB, slack=0)
              if b[0] > 100 and _inside(b, plot, margin=30)]
    assert pieces
    band = (sum(b[0] for b in pieces), min(b[1] for b in pieces), min(b[2] for b in pieces),
            max(b[3] for b in pieces), max(b[4] for b in pieces))
    assert band[4] - band[2] > plot[4] - plot[2], (band, plot)  # across the whole height
    assert band[1] <= conv2d[1] and conv2d[3] <= band[3]
    assert not (band[1] <= linear[1] <= band[3])
    # four points within tolerance on the axis (x_q, conv.weight, relu, output[0]), in order
    within = [b for b in blobs(rows, html_report.WITHIN_TOLERANCE_RGB) if b[0] >= 20 and _inside(b, plot, 12)]
    assert len(within) == 4, within
    # the dashed tolerance line is drawn inside the plot
    dashes = [b for b in blobs(rows, html_report.TOLERANCE_LINE_RGB) if _inside(b, plot, 4)]
    assert len(dashes) >= 10
    # the missing point's cross sits below the plot area, right of every plotted point
    crosses = [b for b in blobs(rows, html_report.MISSING_RGB) if b[0] >= 10]
    assert any(b[2] > plot[4] and b[1] > linear[3] for b in crosses), crosses


def test_the_suite_against_a_broken_converter_writes_a_page_with_its_divergence(tmp_path):
    """End to end: the plugin's --qref-html on the real suite and a mutant (dequantize with zero_point + 1)."""
    import json
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    page, report = tmp_path / "report.html", tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pytest", str(root / "properties" / "test_equivalence.py"),
                           "-q", "-p", "no:cacheprovider", "-k", "single_op_matches_reference",
                           "--qref-converter", "tests.mutants.pt2e:zero_point_off_by_one", "--qref-seed", "0",
                           "--qref-html", str(page), "--qref-report", str(report)],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 1, done.stdout[-3000:]
    failing = [t for t in json.loads(report.read_text())["tests"] if t["status"] == "failed"]
    assert failing and failing[0]["divergence"]["first"], failing
    first = failing[0]["divergence"]["first"]
    text = page.read_text()
    assert "<svg" in text and html.escape(first) in text
    assert "class Model(nn.Module)" in text  # the shrunk model as code


def test_coverage_section_lists_combinations_and_what_was_never_compared():
    document = make_document()
    document["coverage"] = {
        "axes": ["op", "scheme", "dtype", "observer", "weights", "stage", "quantizer"],
        "combinations": [["conv2d", "affine", "uint8", "minmax", "per-tensor", "pt2e PTQ", "qref", 7]],
        "by_axis": {},
        "never_compared": {"op": ["linear", "matmul"]},
        "required": ["linear"],
        "required_missing": ["linear"],
    }
    text = " ".join(parse(html_report.render(document)).text)
    assert "Coverage" in text and "conv2d" in text and "7" in text
    assert "required by --coverage-at-least but never compared: linear" in text
    assert "op: linear, matmul" in text
    assert "Coverage" not in " ".join(parse(html_report.render(make_document())).text)
