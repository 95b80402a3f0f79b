"""`magpie view`: the page opened in headless Chromium (Debian's chromium + chromium-driver).

Checks the DOM, that filters and search change the visible rows, that injected markup stays text
(no script ran: `window.__pwned` stays undefined) and keeps a screenshot as a test artifact.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from datasets_for_reports import INJECTIONS, make_pairs_dataset, visible_text_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium is not installed: run `make browser` (as root it installs Debian's chromium "
    "and chromium-driver) to run the browser tests",
)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return make_pairs_dataset(tmp_path_factory.mktemp("view"), rows=70)


@pytest.fixture(scope="module")
def page(pairs_dir: Path) -> Path:
    result = run_cli("view", str(pairs_dir))
    assert result.returncode == 0, result.stderr
    return pairs_dir / "view.html"


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium is not installed: run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver, path: Path, timeout: float = 60) -> None:
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + timeout
    while driver.execute_script("return document.body.dataset.loaded") != "1":
        assert time.monotonic() < deadline, "the page did not finish loading its rows"
        time.sleep(0.05)


def _visible(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.visible"))


def _wait_visible(driver, expected: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _visible(driver) != expected:
        assert time.monotonic() < deadline, f"visible rows {_visible(driver)} != {expected}"
        time.sleep(0.05)


def test_page_is_self_contained_and_escaped(page: Path) -> None:
    html = page.read_text()
    assert "Content-Security-Policy" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "no network resources"
    assert html.count("<script") == html.count("</script>")  # data cannot close its block
    for injected in INJECTIONS:
        assert injected not in html


@needs_browser
def test_rows_filters_search_and_injections_in_chromium(
    browser, page: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    table = pq.read_table(sorted(pairs_dir.glob("part-*.parquet")))
    n = table.num_rows
    _open(browser, page)
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert _visible(browser) == n
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows article.row")
    assert len(rows) == min(20, n)
    first = rows[0]
    assert table.column("instruction")[0].as_py() in first.text
    assert "Chosen (reward" in first.text and "Rejected (reward" in first.text
    status = browser.find_element(By.ID, "status").text
    assert f"rows 1-20 of {n}" in status

    # filter by task category: the visible count is the number of such rows
    categories = table.column("task_category").to_pylist()
    Select(browser.find_element(By.ID, "filter-task_category")).select_by_visible_text(
        f"Math ({categories.count('Math')})"
    )
    _wait_visible(browser, categories.count("Math"))
    badges = browser.find_elements(By.CSS_SELECTOR, "#rows .badge")
    assert any(b.text == "task_category: Math" for b in badges)
    Select(browser.find_element(By.ID, "filter-task_category")).select_by_index(0)
    _wait_visible(browser, n)

    # full-text search (case-insensitive) over instruction, chosen and rejected
    texts = visible_text_rows(table)
    search = browser.find_element(By.ID, "search")
    search.send_keys("LANTERN COPPER")
    _wait_visible(browser, sum("lantern copper" in t.lower() for t in texts))
    search.clear()
    search.send_keys("window.__pwned = 1</script>")
    expected = sum("window.__pwned = 1</script>" in t for t in texts)
    assert expected > 0
    _wait_visible(browser, expected)
    shown = browser.find_element(By.ID, "rows")
    assert "<script>window.__pwned = 1</script>" in shown.text  # shown literally, as text
    assert not shown.find_elements(By.TAG_NAME, "script")

    # every injected row, in plain and Markdown views, stays inert
    search.clear()
    search.send_keys("window.__pwned")
    _wait_visible(browser, sum("window.__pwned" in t for t in texts))
    for markdown in (False, True):
        if markdown:
            browser.find_element(By.ID, "markdown").click()
        assert not shown.find_elements(By.TAG_NAME, "img")
        assert not shown.find_elements(By.TAG_NAME, "script")
        assert not shown.find_elements(By.TAG_NAME, "textarea")
        assert browser.execute_script("return typeof window.__pwned") == "undefined"
    browser.save_screenshot(str(tmp_path / "view-injections.png"))
    browser.find_element(By.ID, "markdown").click()

    # the injected task category is an option's text, not markup
    labels = [o.text for o in Select(browser.find_element(By.ID, "filter-task_category")).options]
    assert any(label.startswith('<img src=x onerror="window.__pwned = 5">') for label in labels)

    # markdown renders code blocks and bold as elements built from text
    search.clear()
    search.send_keys("Here is code")
    _wait_visible(browser, sum("Here is code" in t for t in texts))
    browser.find_element(By.ID, "markdown").click()
    code = browser.find_elements(By.CSS_SELECTOR, "#rows pre code")
    assert code and code[0].text == "print('<b>hi</b>')"
    assert browser.find_elements(By.CSS_SELECTOR, "#rows .md li strong")
    browser.find_element(By.ID, "markdown").click()

    # paging
    search.clear()
    search.send_keys(" ")
    search.send_keys("\b")
    _wait_visible(browser, n)
    browser.find_element(By.ID, "next").click()
    second = browser.find_elements(By.CSS_SELECTOR, "#rows article.row")[0]
    assert second.get_attribute("data-index") == "20"
    assert "rows 21-40" in browser.find_element(By.ID, "status").text
    assert browser.execute_script("return typeof window.__pwned") == "undefined"

    shot = tmp_path / "view.png"
    browser.find_element(By.ID, "prev").click()
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def _big_table(rows: int) -> pa.Table:
    """A DPO table of `rows` rows of about 3 KB each (instruction ~300 chars, replies ~1.4 KB)."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    chosen, rejected, instructions = [], [], []
    for i in range(rows):
        ins = f"row {i} " + text(60)
        instructions.append(ins)
        chosen.append(
            [{"content": ins, "role": "user"}, {"content": text(280), "role": "assistant"}]
        )
        rejected.append(
            [{"content": ins, "role": "user"}, {"content": text(280), "role": "assistant"}]
        )
    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    return pa.table(
        {
            "instruction": instructions,
            "chosen": pa.array(chosen, msg),
            "rejected": pa.array(rejected, msg),
            "chosen_reward": [rng.uniform(0, 1) for _ in range(rows)],
            "rejected_reward": [rng.uniform(-1, 0) for _ in range(rows)],
            "task_category": [("Math", "Coding", "Planning")[i % 3] for i in range(rows)],
            "language": ["EN"] * rows,
        }
    )


@pytest.mark.slow
@needs_browser
def test_view_of_100k_rows(browser, tmp_path: Path) -> None:
    """Load time at 100K rows (printed, never asserted) and that filtering still works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = tmp_path / "big"
    d.mkdir()
    pq.write_table(_big_table(100_000), d / "data.parquet")
    started = time.monotonic()
    result = run_cli("view", str(d))
    build = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    page = d / "view.html"
    started = time.monotonic()
    browser.get(page.resolve().as_uri())
    first = browser.execute_script("return document.body.dataset.firstPageMs")
    _open(browser, page, timeout=300)
    wall = time.monotonic() - started
    loaded = browser.execute_script("return document.body.dataset.loadedMs")
    assert _visible(browser) == 100_000
    Select(browser.find_element(By.ID, "filter-task_category")).select_by_index(1)
    t0 = time.monotonic()
    _wait_visible(browser, 33_334, timeout=60)
    filter_s = time.monotonic() - t0
    search = browser.find_element(By.ID, "search")
    t0 = time.monotonic()
    search.send_keys("row 99999 ")
    _wait_visible(browser, 1, timeout=60)
    search_s = time.monotonic() - t0
    print(
        f"\n100K rows: page {page.stat().st_size / 1e6:.0f} MB built in {build:.1f} s (CLI); "
        f"first page at {first} ms, all rows at {loaded} ms after navigation "
        f"(wall {wall:.1f} s); filter {filter_s:.2f} s; search {search_s:.2f} s"
    )


def _conversation_table() -> pa.Table:
    turns = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    conversations = [
        [
            {"from": "human", "value": f"first question {i}"},
            {"from": "gpt", "value": f"first answer {i}"},
            {"from": "human", "value": f"follow-up {i} </textarea><img src=x onerror=alert(1)>"},
            {"from": "gpt", "value": f"second answer {i}"},
        ]
        for i in range(30)
    ]
    return pa.table(
        {
            "instruction": [f"first question {i}" for i in range(30)],
            "conversations": pa.array(conversations, turns),
            "difficulty": [("easy", "hard")[i % 2] for i in range(30)],
        }
    )


@needs_browser
def test_multi_turn_conversations_in_chromium(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    d = tmp_path / "multi"
    d.mkdir()
    pq.write_table(_conversation_table(), d / "data.parquet")
    result = run_cli("view", str(d), "--out", str(tmp_path / "multi.html"))
    assert result.returncode == 0, result.stderr
    assert "multi" in result.stdout
    _open(browser, tmp_path / "multi.html")
    assert _visible(browser) == 30
    first = browser.find_elements(By.CSS_SELECTOR, "#rows article.row")[0]
    turns = first.find_elements(By.CSS_SELECTOR, ".turn")
    assert [t.find_element(By.CSS_SELECTOR, ".role").text for t in turns] == [
        "human",
        "gpt",
        "human",
        "gpt",
    ]
    assert "follow-up 0 </textarea><img src=x onerror=alert(1)>" in turns[2].text
    assert not browser.find_elements(By.CSS_SELECTOR, "#rows img, #rows textarea")
    search = browser.find_element(By.ID, "search")
    search.send_keys("second answer 17")
    _wait_visible(browser, 1)


def _header(page: str) -> dict:
    import json

    block = re.search(r'id="magpie-header">(.*?)</script>', page).group(1)
    return json.loads(block)


def test_each_kind_of_dataset_gets_its_layout() -> None:
    from magpie.view import render_html

    base = {"instruction": ["q1", "q2"]}
    sft = pa.table({**base, "response": ["a1", None]})
    scored = pa.table({**base, "responses": [["a", "b"], []], "rewards": [[1.0, 2.0], []]})
    multi = _conversation_table()
    plain = pa.table(base)
    kinds = [_header(render_html(t, "t"))["kind"] for t in (sft, scored, multi, plain)]
    assert kinds == ["sft", "responses", "multi", "instructions"]
    header = _header(render_html(multi, "<b>t</b>"))
    assert header["rows"] == 30 and header["tags"] == {"difficulty": ["easy", "hard"]}
    assert "<title>&lt;b&gt;t&lt;/b&gt;</title>" in render_html(multi, "<b>t</b>")


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    result = run_cli("view", str(tmp_path / "nope"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist: pass `magpie view` a dataset directory" in result.stderr


def test_every_block_has_the_same_columns(monkeypatch) -> None:
    """A multi-turn pair in a later block still lines up: each block carries each column."""
    import json

    from magpie import view

    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))

    def pair(i: int, turns: int) -> list[dict]:
        roles = ["user", "assistant"] * turns
        return [{"content": f"{i}-{k}", "role": r} for k, r in enumerate(roles)]

    table = pa.table(
        {
            "instruction": [f"{i}-0" for i in range(5)],
            "chosen": pa.array([pair(i, 2 if i == 3 else 1) for i in range(5)], msg),
            "rejected": pa.array([pair(i, 2 if i == 3 else 1) for i in range(5)], msg),
        }
    )
    monkeypatch.setattr(view, "CHUNK_ROWS", 2)
    page = view.render_html(table, "t")
    blocks = re.findall(r'id="magpie-rows-\d+">(.*?)</script>', page)
    assert len(blocks) == 3
    columns = [json.loads(b) for b in blocks]
    assert all(set(c) == set(columns[0]) for c in columns)
    context = [row for c in columns for row in c["context"]]
    assert context == [None, None, None, [["assistant", "3-1"], ["user", "3-2"]], None]
    chosen = [row for c in columns for row in c["chosen"]]
    assert chosen == ["0-1", "1-1", "2-1", "3-3", "4-1"]
