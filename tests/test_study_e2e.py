"""End to end: `mergescope study --quick` from nothing, the report in a real headless browser, the cache."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_report_numbers_match_results(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    html = (study_dir / "report.html").read_text()
    for row in results["merging"]["rows"]:
        assert f"{row['accuracy']:.4f}" in html
    for path in results["convexity"]["paths"].values():
        assert f"{path['barrier_loss']:.4f}" in html


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
