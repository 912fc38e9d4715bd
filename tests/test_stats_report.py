"""The lesion statistics report without a model (issue 36, point 3): `medseg stats --report
[--group-by COLUMN]`, `pipelines/stats_report.yaml` with `stage.stats_report.group_by`, the
stage list (`medseg run --list-stages`, docs/pipelines.md), each through the `medseg` command
as a user runs it, and the page in a headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import open_in_browser
from conftest import REPO, artifact_path, relocated_manifest
from PIL import Image

from medseg.errors import ConfigError
from medseg.manifest import Case, read_manifest
from medseg.manifest_groups import EMPTY_GROUP, MAX_GROUPS, case_groups
from medseg.pipeline import STAGES
from medseg.report.stats_page import StatsReportInputs, write_stats_report

SITES = ["A", "A", "A", "B", "B"]  # the group test's site column: legend "site A (n=3)", "site B (n=2)"
COLUMNS = "case_id, patient_id, modality, image_flair, image_t1, label, split, site"


def medseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``medseg ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, phantom_manifest) -> Path:
    """Five small phantoms, their manifest with a ``site`` column (:data:`SITES`)."""
    tmp = tmp_path_factory.mktemp("cohort")
    return relocated_manifest(phantom_manifest(len(SITES), (40, 36, 12), seed=6), tmp / "data" / "sites.csv", site=SITES)


@pytest.fixture(scope="module")
def grouped(cohort) -> tuple[subprocess.CompletedProcess, Path]:
    """``medseg stats sites.csv --out OUT --report --group-by site`` (run once for the module)."""
    out = cohort.parent.parent / "stats_by_site"
    return medseg("stats", str(cohort), "--out", str(out), "--report", "--group-by", "site", "--no-progress",
                  cwd=cohort.parent.parent), out


def _legend(png: Path) -> list[str]:
    """The legend entries a medseg figure records in its PNG metadata."""
    return Image.open(png).info["Description"].removeprefix("legend: ").split("; ")


# --------------------------------------------------------------------------- medseg stats --report


def test_stats_report_overlays_the_groups_with_their_case_counts(grouped, cohort):
    result, out = grouped
    assert result.returncode == 0, result.stderr
    page = out / "report" / "report.html"
    assert f"report: {page}" in result.stdout
    text = page.read_text(encoding="utf-8")
    for section in ("Dataset", "Lesion-distribution curves", "Lesion sizes", "Slices with lesion", "Cases", "Provenance"):
        assert f"<h2>{section}</h2>" in text
    assert text.count("data:image/png;base64,") == 4  # all cases, by site, lesion sizes, slices with lesion
    expected = [f"site {site} (n={SITES.count(site)})" for site in sorted(set(SITES))]
    assert expected == ["site A (n=3)", "site B (n=2)"]
    for png in ("lesion_curve_groups.png", "lesion_volumes.png", "slices_with_lesion.png"):
        assert _legend(out / "report" / png) == expected, png
    assert all(label in text for label in expected)


def test_group_curves_are_the_mean_of_each_groups_cases(grouped, cohort):
    """Each group's curve, averaged independently from the per-case curves of ``medseg stats``
    (CSV tables keep 0.01 mm² and positions to 1e-4: medseg.rounding), and the lesion table."""
    _, out = grouped
    curves = pd.read_csv(out / "report" / "group_curves.csv")
    per_case = pd.read_csv(out / "lesion_curve_per_case.csv", dtype={"case_id": str})
    site_of = dict(zip(pd.read_csv(cohort, dtype=str)["case_id"], SITES, strict=True))
    for site in sorted(set(SITES)):
        ids = [c for c, s in site_of.items() if s == site]
        mine = per_case[per_case["case_id"].isin(ids)].groupby("position")["lesion_area_mm2"].mean().to_numpy()
        group = curves[curves["site"] == site]
        assert (group["n_cases"] == len(ids)).all()
        np.testing.assert_allclose(group["mean"].to_numpy(), mine, rtol=0, atol=0.02)
    volumes = pd.read_csv(out / "lesion_volumes.csv")  # one row per lesion: they add up to each case's volume
    cases = pd.read_csv(out / "case_stats.csv").set_index("case_id")
    np.testing.assert_allclose(volumes.groupby("case_id")["volume_ml"].sum().sort_index(),
                               cases["lesion_volume_ml"].sort_index(), rtol=0, atol=1e-3)
    assert (volumes.groupby("case_id").size().sort_index() == cases["n_lesions_3d"].sort_index()).all()


def test_stats_report_renders_in_headless_chromium(grouped, tmp_path):
    _, out = grouped
    shot = artifact_path(tmp_path, "stats_report.png")
    check = """
    const rows = id => document.getElementById(id) ? document.getElementById(id).tBodies[0].rows.length : -1;
    return {cases: rows('stats_cases'), groups: rows('groups'),
            captions: Array.from(document.querySelectorAll('figcaption')).map(f => f.textContent),
            groupCells: Array.from(document.querySelectorAll('#groups tbody td')).map(td => td.textContent)};
    """
    images, logs, page = open_in_browser(out / "report" / "report.html", shot, check)
    assert len(images) == 4 and all(complete and width > 0 for complete, width in images), images
    assert page["cases"] == len(SITES) and page["groups"] == 2
    assert "site A (n=3)" in page["groupCells"] and "site B (n=2)" in page["groupCells"]
    assert any("site A (n=3); site B (n=2)" in caption for caption in page["captions"])
    assert not [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert shot.stat().st_size > 10_000


def test_a_missing_group_column_is_refused_listing_the_manifests_columns(cohort, tmp_path):
    result = medseg("stats", str(cohort), "--out", str(tmp_path / "out"), "--group-by", "scanner", cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: --group-by scanner: {cohort} has no column 'scanner'; its columns are {COLUMNS}." in result.stderr
    assert not (tmp_path / "out" / "case_stats.csv").exists()  # refused before any case is read


def test_group_values_blank_too_many_and_file_columns(cohort, tmp_path):
    rows = pd.read_csv(cohort, dtype=str, keep_default_na=False)
    rows.loc[0, "site"] = ""
    rows["scanner"] = [f"s{i}" for i in range(len(rows))]
    manifest = cohort.parent / "variants.csv"
    rows.to_csv(manifest, index=False)
    cases = read_manifest(manifest)
    assert list(case_groups(cases, "site", manifest).values()) == [EMPTY_GROUP, "A", "A", "B", "B"]
    assert set(case_groups(cases, "modality", manifest).values()) == {"MR"}
    with pytest.raises(ConfigError, match="names a file or a case, not a group; group by one of patient_id, modality, split, site, scanner"):
        case_groups(cases, "image_flair", manifest)
    many = [Case(f"x{i}", c.patient_id, c.modality, c.images, c.label, c.split, {**c.extra, "scanner": f"s{i}"})
            for i, c in enumerate(cases * 3)]
    with pytest.raises(ConfigError, match=f"has {len(many)} distinct values .* at most {MAX_GROUPS} groups"):
        case_groups(many, "scanner", manifest)


def test_report_of_failed_cases_and_of_statistics_without_lesion_volumes(grouped, cohort, tmp_path):
    """Failures get their section; statistics of an older medseg (no lesion_volumes.csv) and
    statistics where every case failed still give a page, saying what is missing."""
    _, out = grouped
    stats = tmp_path / "stats"
    shutil.copytree(out, stats, ignore=shutil.ignore_patterns("report"))
    (stats / "lesion_volumes.csv").unlink()
    pd.DataFrame([{"case_id": "phantom_009", "stage": "stats", "error": "label file not found"}]).to_csv(
        stats / "failures.csv", index=False)
    cases = read_manifest(cohort)
    text = write_stats_report(StatsReportInputs(stats, cases), tmp_path / "report").read_text(encoding="utf-8")
    assert re.findall(r"<h2>(.*?)</h2>", text) == ["Dataset", "Lesion-distribution curve", "Lesion sizes",
                                                   "Slices with lesion", "Cases", "Failures", "Provenance"]
    assert "No lesion_volumes.csv in" in text and "label file not found" in text
    (stats / "case_stats.csv").write_text("\n")  # what medseg stats writes when no case could be measured
    text = write_stats_report(StatsReportInputs(stats, cases), tmp_path / "none").read_text(encoding="utf-8")
    assert re.findall(r"<h2>(.*?)</h2>", text) == ["Dataset", "Failures", "Provenance"]
    assert "No case could be measured" in text


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.slow(reason="three `medseg run` processes, each importing torch: 12 s on 2 idle cores, 35 s on busy ones")
def test_stats_report_pipeline_with_group_by_and_its_errors(cohort, tmp_path):
    """A missing column stops the run at the report stage (the statistics stay); the rerun
    without grouping and then with ``site`` reuse them."""
    run_dir = tmp_path / "run"
    base = ["run", str(REPO / "pipelines" / "stats_report.yaml"), "--set", f"pipeline.manifest={cohort}", "--out",
            str(run_dir), "--no-progress"]  # fmt: skip
    bad = medseg(*base, "--set", "stage.stats_report.group_by=scanner", cwd=tmp_path)
    assert bad.returncode == 2
    assert f"error: stage.stats_report.group_by=scanner: {cohort} has no column 'scanner'; its columns are {COLUMNS}." \
        in bad.stderr
    assert (run_dir / "stats" / "case_stats.csv").is_file() and not (run_dir / "stats_report" / "report.html").exists()

    plain = medseg(*base, cwd=tmp_path)
    page = run_dir / "stats_report" / "report.html"
    assert plain.returncode == 0, plain.stderr
    assert "[stats] up to date (skipped)" in plain.stdout and f"report: {page}" in plain.stdout
    assert "Lesion-distribution curve</h2>" in page.read_text(encoding="utf-8")
    assert not (run_dir / "stats_report" / "group_curves.csv").exists()

    by_site = medseg(*base, "--set", "stage.stats_report.group_by=site", cwd=tmp_path)
    assert by_site.returncode == 0, by_site.stderr
    assert "[stats] up to date (skipped)" in by_site.stdout and "[stats_report] running" in by_site.stdout
    assert _legend(run_dir / "stats_report" / "lesion_curve_groups.png") == ["site A (n=3)", "site B (n=2)"]
    assert "site B (n=2)" in page.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the stage list


def test_list_stages_prints_every_stage_with_its_line_and_the_docs_list_them(tmp_path):
    result = medseg("run", "--list-stages", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(STAGES)
    for line, stage in zip(lines, STAGES.values(), strict=True):
        assert stage.description and stage.description in line
    documented = re.findall(r"^\| `([a-z_]+)` \|", (REPO / "docs" / "pipelines.md").read_text(encoding="utf-8"), re.M)
    assert documented == list(STAGES)
    missing = medseg("run", cwd=tmp_path)
    assert missing.returncode == 2 and "--list-stages" in missing.stderr
