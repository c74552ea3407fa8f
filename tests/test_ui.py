"""tunelab ui: the pages in real headless Chromium against a real server on 127.0.0.1 (fixture runs written
as files, one tiny trained run for the playground, one tiny training started from the form for the live
page), and the API's security and the runs index's cache without a browser."""

import json
import os
import re
import signal

import pytest
import yaml
from starlette.testclient import TestClient

from helpers import TINY_LR, toy_rows, train_tiny_run

WAIT_S = 240  # the longest a page may take to show what is awaited (a training subprocess on a loaded machine)


def write_run(root, name, lr, r, losses, status="finished", evals=None):
    """A run folder as the trainer leaves it (config, metrics, summary or failure), written directly."""
    run = root / name
    run.mkdir(parents=True)
    config = {"model": "tiny-llama", "method": "lora", "run_name": name, "train": {"lr": lr, "max_steps": len(losses)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"lora": {"r": r, "alpha": 16}}), encoding="utf-8")
    records = []
    for i, loss in enumerate(losses, 1):
        record = {"step": i, "epoch": i / 4, "loss": loss, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 900.0}
        records.append(record | {"tokens_seen": 64 * i, "train_s": 0.5 * i} | ((evals or {}).get(i) or {}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records), encoding="utf-8")
    if status == "finished":
        summary = {
            "method": "lora",
            "model": "tiny-llama",
            "steps": len(losses),
            "final_train_loss": losses[-1],
            "eval": {"eval_loss": losses[-1] + 0.1},
            "peak_mem_bytes": 500 << 20,
            "train_tokens_per_s": 900.0,
            "artifact_bytes": 36000,
            "train_wall_s": 0.5 * len(losses),
            "train_tokens": 64 * len(losses),
            "hints": ["eval loss rose for 2 evaluations while train loss fell: overfitting"],
        }
        (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    else:
        (run / "failure.json").write_text(json.dumps({"error": "non-finite loss", "step": len(losses)}))
    return run


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A dashboard on 127.0.0.1 over one runs directory: runs a, b (finished), c (failed), tiny (trained)."""
    from tunelab.serve.server import ServerThread
    from tunelab.ui.server import UiOptions, UiServing

    tmp = tmp_path_factory.mktemp("ui")
    runs = tmp / "runs"
    write_run(
        runs, "a", 1e-3, 8, [2.0 - 0.1 * i for i in range(12)], evals={6: {"eval_loss": 1.6}, 12: {"eval_loss": 1.2}}
    )
    write_run(runs, "b", 3e-3, 16, [2.2 - 0.15 * i for i in range(8)], evals={8: {"eval_loss": 1.5}})
    write_run(runs, "c", 1e-1, 8, [2.0, 9.0, 40.0], status="failed")
    (runs / "compare-ab").mkdir()
    (runs / "compare-ab" / "report.html").write_text("<h1>a vs b</h1>")
    tiny = train_tiny_run(tmp, val_fraction=0, run_name="tiny", max_steps=2, lr=TINY_LR["lora"]).run_dir
    (tmp / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(48)), encoding="utf-8")
    serving = UiServing(UiOptions(runs=[str(runs)]))
    with ServerThread(serving) as url:
        yield {"url": url, "runs": runs, "tiny": tiny, "data": tmp / "toy.jsonl", "serving": serving}
    for job in serving.dashboard.jobs.jobs.values():  # a training this module started and did not see end
        if job.returncode is None:
            os.kill(job.process.pid, signal.SIGKILL)
            job.process.wait()


def wait(driver, condition, timeout=WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the live page re-renders its parts every second: an element found a moment ago may be replaced
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    return waiting.until(lambda d: condition(d))


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_runs_table_lists_the_runs_and_sorts_them(ui, browser):
    browser.get(ui["url"] + "/")
    wait(browser, lambda d: len(css(d, "#runs tbody tr")) == 4)
    rows = {tr.get_attribute("data-id"): tr.text for tr in css(browser, "#runs tbody tr")}
    assert set(rows) == {"0/a", "0/b", "0/c", "0/tiny"}
    assert "finished" in rows["0/a"] and "failed" in rows["0/c"] and "500.0 MiB" in rows["0/a"]
    css(browser, 'th[data-key="steps"]')[0].click()  # ascending by steps: c (3), tiny (2)... a (12) last
    steps = [tr.get_attribute("data-id") for tr in css(browser, "#runs tbody tr")]
    assert steps == ["0/tiny", "0/c", "0/b", "0/a"]
    assert [a.text for a in css(browser, "#reports a")] == ["compare-ab/report.html"]
    css(browser, "#filter")[0].send_keys("failed")
    assert [tr.get_attribute("data-id") for tr in css(browser, "#runs tbody tr")] == ["0/c"]


def test_two_selected_runs_overlay_their_curves_with_the_config_diff(ui, browser):
    from selenium.webdriver.support.ui import Select

    browser.get(ui["url"] + "/")
    wait(browser, lambda d: len(css(d, "#runs tbody tr")) == 4)
    for run_id in ("0/a", "0/b"):
        css(browser, f'tr[data-id="{run_id}"] input.select')[0].click()
    css(browser, "#compare")[0].click()
    wait(browser, lambda d: css(d, "#compare-chart path.series"))
    series = {p.get_attribute("data-name"): p for p in css(browser, "#compare-chart path.series")}
    assert {k: int(p.get_attribute("data-points")) for k, p in series.items()} == {"a": 12, "b": 8}
    assert all(p.size["width"] > 100 and p.get_attribute("d").count("L") >= 7 for p in series.values())  # drawn
    Select(css(browser, "#metric")[0]).select_by_visible_text("eval_loss")
    Select(css(browser, "#x-axis")[0]).select_by_visible_text("tokens seen")
    points = {p.get_attribute("data-name"): int(p.get_attribute("data-points")) for p in css(browser, "path.series")}
    assert points == {"a": 2, "b": 1}
    diff = [tr.find_elements("css selector", "td")[0].text for tr in css(browser, "#config-diff tbody tr")]
    assert sorted(diff) == ["lora.r", "run_name", "train.lr", "train.max_steps"]  # alpha and model are the same
    assert "500.0 MiB" in css(browser, "#side-by-side")[0].text


def test_start_form_rejects_a_bad_key_with_the_cli_message(ui, browser, capsys):
    from tunelab import cli

    browser.get(ui["url"] + "/start")
    wait(browser, lambda d: css(d, "#overrides"))
    css(browser, "#model")[0].send_keys("tiny-llama")
    css(browser, "#data")[0].send_keys(str(ui["data"]))
    css(browser, "#overrides")[0].send_keys("train.lrr=0.01")
    css(browser, "#start")[0].click()
    error = wait(browser, lambda d: [e for e in css(d, "#start-error") if e.is_displayed()])[0]
    error = error.get_property("textContent")
    assert "unknown key 'train.lrr'" in error
    config = re.search(r"(\S+\.yaml)", error).group(1)  # the file the form's config was written to
    capsys.readouterr()
    assert cli.main(["train", config]) == 2
    assert capsys.readouterr().err == f"error: {error}\n"
    assert not (ui["runs"] / "new-run").exists()


def test_a_run_started_from_the_form_gains_points_live_and_stops_with_a_checkpoint(ui, browser):
    browser.get(ui["url"] + "/start")
    wait(browser, lambda d: css(d, "#overrides"))
    for field, value in (("model", "tiny-llama"), ("data", str(ui["data"])), ("steps", "3000"), ("lr", "0.01")):
        css(browser, f"#{field}")[0].send_keys(value)
    css(browser, "#run_name")[0].send_keys("live")
    css(browser, "#overrides")[0].send_keys("train.batch_size=2\ndata.val_fraction=0\ntrain.precision=fp32")
    css(browser, "#start")[0].click()
    wait(browser, lambda d: d.current_url.endswith("/run/0/live"))

    def points(d):
        found = css(d, '#chart-loss path.series[data-name="train loss"]')
        return int(found[0].get_attribute("data-points")) if found else 0

    first = wait(browser, points)  # the page was not reloaded: the curve grows in place
    wait(browser, lambda d: points(d) > first)
    assert css(browser, "#run-status")[0].text == "running"
    css(browser, "#stop")[0].click()
    wait(browser, lambda d: css(d, "#run-status")[0].text == "interrupted")
    assert f"tunelab train --resume {ui['runs'] / 'live'}" in css(browser, "#detail")[0].text
    assert css(browser, "#checkpoints li")  # the graceful stop wrote one
    assert ui["serving"].dashboard.jobs.get(ui["runs"] / "live").process.wait(timeout=60) == 143  # SIGTERM's code


def test_playground_answers_what_tunelab_generate_prints(ui, browser, capsys):
    from selenium.webdriver.support.ui import Select

    from tunelab import cli

    prompt = "Repeat the word: blue"
    browser.get(ui["url"] + "/playground")
    wait(browser, lambda d: css(d, "#run-a option"))
    Select(css(browser, "#run-a")[0]).select_by_value("0/tiny")
    for field, value in (("temperature", "0"), ("max_new_tokens", "8")):
        css(browser, f"#{field}")[0].clear()
        css(browser, f"#{field}")[0].send_keys(value)
    css(browser, "#prompt")[0].send_keys(prompt)
    css(browser, "#send")[0].click()
    reply = wait(browser, lambda d: css(d, "#transcript-a .msg.assistant:not(.pending)"))[0].get_property("textContent")
    capsys.readouterr()
    args = ["generate", str(ui["tiny"]), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8"]
    assert cli.main([*args, "--no-stream"]) == 0
    assert reply == capsys.readouterr().out.strip() and reply


# --- without a browser ----------------------------------------------------------------------------------
def _client(runs, key=None, host="127.0.0.1"):
    from tunelab.ui.server import UiOptions, UiServing

    return TestClient(
        UiServing(UiOptions(runs=[str(runs)], host=host, api_key=key), log=lambda m: None).app,
        base_url="http://127.0.0.1:8080",
    )


def test_no_file_outside_the_runs_directory_is_served(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", 1e-3, 8, [1.0, float("nan")])  # a diverged step: NaN in the log
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
    (runs / "a" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (runs / "escape").symlink_to(tmp_path)
    client = _client(runs)
    assert client.get("/files/0/a/config.yaml").status_code == 200
    for path in (
        "/files/0/a/link.txt",
        "/files/0/%2e%2e/secret.txt",
        "/files/0/escape/secret.txt",
        "/files/1/x",
        "/files/0/..%2Fsecret.txt",
        "/api/run/0/..%2Fa",
        "/api/run/0/escape",
        "/api/run/0/a%2F..%2F..%2Fx",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "TOP-SECRET" not in response.text
    assert [r["id"] for r in client.get("/api/runs").json()["runs"]] == ["0/a"]  # the symlink out is no run
    assert [r["loss"] for r in client.get("/api/run/0/a/metrics").json()["records"]] == [1.0, None]  # valid JSON


def test_predictions_come_worst_first_and_the_confusion_matrix_is_labelled(tmp_path):
    runs = tmp_path / "runs"
    run = write_run(runs, "a", 1e-3, 8, [1.0, 0.5])
    scores = [(1.0, 1.0), (0.0, 0.5), (1.0, 0.9), (0.0, 0.1)]  # (exact match, ROUGE-L) of lines 0-3
    rows = [
        {"line": i, "prediction": "p", "reference": "r", "exact_match": e, "rougeL": r}
        for i, (e, r) in enumerate(scores)
    ]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.json").write_text(json.dumps({"eval_accuracy": 0.5, "eval_confusion_matrix": [[1, 1], [0, 2]]}))
    config = yaml.safe_load((run / "config.yaml").read_text()) | {"data": {"labels": ["spam", "ham"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    client = _client(runs)
    page = client.get("/api/run/0/a/predictions", params={"limit": 3}).json()
    assert page["total"] == 4 and [r["line"] for r in page["rows"]] == [3, 1, 2]
    details = client.get("/api/run/0/a").json()
    assert details["confusion"] == {"matrix": [[1, 1], [0, 2]], "labels": ["spam", "ham"]}
    assert details["predictions"] == ["predictions.jsonl"] and details["eval"] == {"eval_accuracy": 0.5}
    assert client.get("/api/run/0/a/predictions", params={"file": "../summary.json"}).status_code == 404


def test_api_key_login_cookie_and_cross_site_requests(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", 1e-3, 8, [1.0, 0.5])
    client = _client(runs, key="k-123", host="0.0.0.0")
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer k-123"}).status_code == 200
    page = client.get("/run/0/a", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Frun%2F0%2Fa"
    wrong = client.post(
        "/login",
        content="key=nope&next=/",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert wrong.status_code == 303 and "failed" in wrong.headers["location"] and "tunelab_ui_key" not in client.cookies
    client.post(
        "/login",
        content="key=k-123&next=/",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert client.get("/api/runs").status_code == 200  # the cookie
    cross = client.post("/api/run/0/a/stop", headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    loopback = _client(runs)
    assert loopback.get("/api/runs", headers={"Host": "evil.example:8080"}).status_code == 403  # DNS rebinding
    assert loopback.get("/api/runs").status_code == 200


def test_the_runs_index_reparses_only_what_changed(tmp_path):
    from tunelab.ui.index import RunsIndex

    runs = tmp_path / "runs"
    for name in ("a", "b", "c"):
        write_run(runs, name, 1e-3, 8, [1.0, 0.5], status="failed")
    index = RunsIndex([runs])
    assert [r["steps"] for r in index.rows()] == [2, 2, 2] and index.rebuilt == 3
    index.rows()
    assert index.rebuilt == 3  # nothing changed: every row from the cache
    with open(runs / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.4}) + "\n" + '{"step": 4, "lo')  # a line being appended
    assert [r["steps"] for r in index.rows()] == [2, 3, 2] and index.rebuilt == 4
    with open(runs / "b" / "metrics.jsonl", "a") as f:
        f.write('ss": 0.3}\n')
    assert index.rows()[1]["steps"] == 4
    assert [r["step"] for r in index.metrics.records(runs / "b" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_cli_refuses_another_address_without_a_key(tmp_path, capsys):
    from tunelab import cli

    assert cli.main(["ui", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err == "error: tunelab ui --host 0.0.0.0 needs --api-key-file FILE (or --no-auth)\n"
