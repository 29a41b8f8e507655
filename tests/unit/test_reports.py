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


def test_a_delta_inside_the_noise_band_is_not_a_change():
    # candidate 0.50 on n=100: band = 1.96·sqrt(0.25/100) = 0.098; +0.05 is noise, +0.15 is a change
    metrics = {"test_id": {"accuracy": 0.50, "n": 100},
               "comparisons": {"base": {"model": "b", "test_id": {"accuracy": 0.45}},
                               "warm_start": {"model": "w", "test_id": {"accuracy": 0.35}}}}
    row = reports.comparison_rows(metrics, "test_id")[0]
    assert row["others"]["base"]["kind"] == "noise" and "(noise)" in row["others"]["base"]["delta"]
    assert row["others"]["warm_start"]["kind"] == "improvement"
    assert reports.changes(metrics) == {"base": [], "warm_start": ["test_id accuracy: improvement ▲ +0.1500 "
                                                                   "(0.3500 -> 0.5000)"]}


def test_report_samples_alternate_solved_and_failed():
    from amft_lib.evaluate import pick_samples

    samples = [{"id": i, "reward": r} for i, r in enumerate([0, 0, 0, 1, 0, 1])]
    assert [s["id"] for s in pick_samples(samples, 4)] == [3, 0, 5, 1]
    assert [s["id"] for s in pick_samples(samples[:3], 2)] == [0, 1]  # no solved ones: failures only


def test_training_curves_carry_mu_bounds_and_meta_steps(tmp_path):
    import json

    import yaml

    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "mu": 0.7, "val_accuracy": 0.2 if s == 0 else None}) + "\n" for s in range(5)))
    (tmp_path / "controller.jsonl").write_text(json.dumps({"step": 3, "mu": 0.7, "meta_grad": 1e-5}) + "\n\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"controller": {"mu_min": 0.05, "mu_max": 0.95}}))
    curves = reports.read_training_curves(str(tmp_path))
    assert curves["meta_step"] == [(3, 0.7)]
    assert curves["mu_min"] == [(0, 0.05), (4, 0.05)] and curves["mu_max"] == [(0, 0.95), (4, 0.95)]
    assert curves["val_accuracy"] == [(0, 0.2)]
    assert "mu" in reports.plot_training_curves(curves)
    # no bounds or meta steps alone make a plot
    assert reports.plot_training_curves({"mu_min": [(0, 0.1)], "meta_step": [(1, 0.5)]}) == {}


def test_training_page_plots_t_per_meta_step_with_the_t_min_band(tmp_path):
    import json

    import yaml

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "mu": 0.5}) + "\n" for s in range(4)))
    records = [{"step": 0, "mu": 0.5, "meta_grad": 1e-4, "meta_grad_t": 0.4},
               {"step": 2, "mu": 0.5, "meta_grad": -2e-4, "meta_grad_t": -3.1},
               {"step": 3, "mu": 0.5, "meta_grad": 0.0, "meta_grad_t": None}]  # no t (one group): not plotted
    (tmp_path / "controller.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"controller": {"meta_t_min": 2.0}}))
    curves = reports.read_training_curves(str(tmp_path))
    assert curves["meta_t"] == [(0, 0.4), (2, -3.1)]
    assert curves["t_min_hi"] == [(0, 2.0), (2, 2.0)] and curves["t_min_lo"] == [(0, -2.0), (2, -2.0)]
    pngs = reports.plot_training_curves(curves)
    assert pngs["meta_t"].startswith(b"\x89PNG")
    assert "meta_t" not in reports.plot_training_curves({"t_min_hi": [(0, 2.0)]})  # the band alone: no plot
