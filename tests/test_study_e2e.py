"""End to end: `mergescope study --quick` from nothing, the report in a real headless browser, the cache."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from mergescope.study import STAGES

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    result = subprocess.run([sys.executable, "-m", "mergescope", "study", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "report:" in result.stdout
    return out


def test_study_writes_results_figures_and_report(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    for stage in STAGES:
        assert stage in results, f"stage {stage} missing from results.json"
    html = (study_dir / "report.html").read_text()
    for stage in STAGES:
        assert f'id="{stage}"' in html
    assert 'id="summary"' in html
    pngs = list((study_dir / "figures").glob("*.png"))
    assert len(pngs) >= len(STAGES)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert list((study_dir / "checkpoints").glob("*.safetensors"))


def test_every_replicate_is_kept_and_the_report_shows_their_intervals(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    html = (study_dir / "report.html").read_text()
    n = results["replicates"]
    assert n >= 2 and all(len(results[stage]["replicates"]) == n for stage in STAGES if stage != "determinism")
    assert len(results["determinism"]["replicates"]) >= n
    # replicates are independent runs: their seeds (and so their numbers) differ
    merges = [{(r["models"], r["method"]): r["accuracy"] for r in rep["rows"]} for rep in results["merging"]["replicates"]]
    assert merges[0].keys() == merges[1].keys() and merges[0] != merges[1]
    for key in merges[0]:  # each method's cell is the mean ± 95% t-interval of its replicates, recomputed here
        values = [100 * m[key] for m in merges]
        mean, sem = np.mean(values), np.std(values, ddof=1) / np.sqrt(n)
        assert f"{mean:.2f} ± {sps.t.ppf(0.975, n - 1) * sem:.2f}" in html, key
    for label in results["convexity"]["replicates"][0]["paths"]:
        values = [r["paths"][label]["barrier_loss"] for r in results["convexity"]["replicates"]]
        assert f"{np.mean(values):.3f}" in html


def test_selection_is_made_on_validation(study_dir):
    """The highlighted best merge of each set is the one with the best mean validation accuracy."""
    from mergescope.study.sections import group_verdicts

    reps = json.loads((study_dir / "results.json").read_text())["merging"]["replicates"]
    for group in dict.fromkeys(r["models"] for r in reps[0]["rows"]):
        chosen = group_verdicts(reps, group)["best_merge"]["method"]
        merges = {r["method"] for r in reps[0]["rows"] if r["models"] == group
                  and r["family"] in ("weight aggregation", "neuron alignment")}
        val = {m: np.mean([r["val_accuracy"] for rep in reps for r in rep["rows"]
                           if r["models"] == group and r["method"] == m]) for m in merges}
        assert val[chosen] == max(val.values())


def test_report_renders_in_headless_chromium(study_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get((study_dir / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) >= len(STAGES)
        assert all(complete and width > 0 for _, complete, width in images), images
        sections = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id);")
        assert set(STAGES) <= set(sections)
        titles = driver.execute_script("return Array.from(document.querySelectorAll('section h2')).map(h => h.textContent);")
        assert [t.split(".")[0] for t in titles] == [str(i) for i in range(1, len(titles) + 1)], titles
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "study_report.png"))
    finally:
        driver.quit()


def test_rerun_reuses_the_cache_and_gives_the_same_results(study_dir):
    before = json.loads((study_dir / "results.json").read_text())
    result = subprocess.run([sys.executable, "-m", "mergescope", "study", "--quick", "--out", str(study_dir)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    after = json.loads((study_dir / "results.json").read_text())
    assert after["models"]["trained"] == 0 and set(after["models"]["stages_reused"]) == set(STAGES)
    assert all(after[stage] == before[stage] for stage in STAGES)
