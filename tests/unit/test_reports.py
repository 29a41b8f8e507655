"""amft_lib.reports: one report model, two renderers, everything untrusted escaped."""

from __future__ import annotations

import re

from amft_lib import reports
from amft_lib.reports import Bullets, Cell, Code, Figure, Heading, Report, Table, Text


def _hostile_report() -> Report:
    evil = "row`<script>alert(1)</script>`|x http://evil.example/a.png"
    return Report(f"Evaluation of {evil}").add(
        Heading(2, evil), Text(evil, strong="NOT BLESSED —"), Table(["metric", evil], [[Cell(evil), Cell("1")]]),
        Bullets([Cell(evil, "regression")]), Code(evil, "```\n" + evil + "\n````"), Figure("mu", b"\x89PNG"))


def test_markdown_escapes_html_and_markdown_in_untrusted_text():
    md = reports.to_markdown(_hostile_report())
    inside = re.search(r"(`{5,})text\n(.*?)\n\1", md, re.S)  # the fence outgrows the 4-backtick run
    assert inside is not None and "<script>" in inside.group(2)
    outside = md.replace(inside.group(0), "")
    assert not re.search(r"(?<!\\)[<`]", outside)  # every < and ` outside the fence is escaped
    row = next(line for line in outside.splitlines() if line.endswith("| 1 |"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # the hostile pipe did not open a cell
    assert "http://" not in outside  # no autolink


def test_html_escapes_and_links_nothing():
    page = reports.to_html(_hostile_report())
    assert "<script>" not in page
    assert not re.search(r"https?://", page)  # URL-shaped text is defused
    assert page.count("data:image/png;base64,") == 1


def test_both_renderers_show_the_same_cells():
    report = Report("t").add(Table(["a", "b"], [[Cell("0.1250"), Cell("▲ +0.0500", "improvement")]]))
    md, page = reports.to_markdown(report), reports.to_html(report)
    for text in ("0.1250", "▲ +0.0500"):
        assert text in md and text in page
    assert "class='improvement'" in page


def test_fmt_rounds_floats_and_keeps_ints():
    assert reports.fmt(0.03999999910593033) == "0.0400"
    assert reports.fmt(12) == "12" and reports.fmt(None) == "–" and reports.fmt(123.456) == "123.5"
