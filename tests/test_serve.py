"""`digits serve`: the real command, on real Ray Serve over HTTP on loopback, in the session's Ray
(one server for the module, its replica at 0 CPUs so that the other tests' CPUs stay free): the
answers are `digits predict`'s, bad requests get 400 and one line while good ones go on being
answered, a swap under load drops nothing, the drawing page works in a real headless browser,
and SIGTERM lets a request in flight finish, then leaves no Serve behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, run_digits

SERVE_START_S = 180


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _request(url: str, body: bytes | None = None, content_type: str = "application/json", timeout: float = 60):
    """(status, parsed JSON or text) of a GET (no body) or POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def _predict(url: str, images: list, timeout: float = 60) -> dict:
    status, answer = _request(url + "predict", json.dumps({"images": images}).encode(), timeout=timeout)
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def server(dense_run, shared_ray_env, tmp_path_factory) -> Server:
    """`digits serve --run dense_run` in the session's Ray, answering on a free loopback port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "digit_models.cli", "serve", "--run", str(dense_run), "--port", str(port)]
            + ["--cpus-per-replica", "0"],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **shared_ray_env},
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + SERVE_START_S
    while "serving " not in log.read_text():
        assert process.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)
    try:
        yield Server(url, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)


@pytest.fixture(scope="module")
def test_images(kaggle_dir) -> tuple[np.ndarray, str]:
    """The slice's test.csv: its images and its text."""
    text = (kaggle_dir / "test.csv").read_text()
    rows = [line.split(",") for line in text.splitlines()[1:]]
    return np.array(rows, dtype=np.uint8).reshape(-1, 28, 28), text


def _scored(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a `digits predict` output, by ImageId."""
    table = pq.read_table(folder / "predictions").sort_by("ImageId")
    probabilities = np.stack([table.column(f"prob_{digit}").to_numpy() for digit in range(10)], axis=1)
    return table.column("Label").to_numpy(), probabilities


def test_bad_command_lines_are_one_line_and_exit_2_before_ray(dense_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {
            ("serve",): "one of the arguments --run --swap is required",
            ("serve", "--run", "no/such/run"): "no/such/run: no such run directory",
            ("serve", "--run", str(dense_run), "--port", "70000"): "--port 70000: must be 1 to 65535",
            ("serve", "--run", str(dense_run), "--port", port): f"cannot listen on 127.0.0.1:{port} (in use)",
            ("serve", "--run", str(dense_run), "--tta", "9"): "--tta 9: must be 0 to 8",
            ("serve", "--swap", str(dense_run)): "--swap: give --address (or RAY_ADDRESS)",
        }
        for args, message in cases.items():
            result = run_digits(*args, env={"RAY_ADDRESS": ""})
            assert result.returncode == 2, (args, result.stderr)
            assert result.stderr.startswith("digits: error: ") and message in result.stderr, result.stderr
            assert result.stderr.count("\n") == 1, result.stderr


def test_json_and_csv_answers_are_digits_predicts(server, dense_run, dense_scored, test_images):
    images, csv_text = test_images
    labels, probabilities = _scored(dense_scored)
    # Concurrent requests of 250 images, as 28x28 arrays and as Kaggle's rows of 784, batched together.
    parts = [
        [image.tolist() if part % 2 else image.reshape(-1).tolist() for image in images[start : start + 250]]
        for part, start in enumerate(range(0, len(images), 250))
    ]
    with ThreadPoolExecutor(len(parts)) as pool:
        answers = list(pool.map(lambda part: _predict(server.url, part), parts))
    served = np.concatenate([np.array(answer["probabilities"]) for answer in answers])
    assert [label for answer in answers for label in answer["labels"]] == labels.tolist()
    np.testing.assert_allclose(served, probabilities, atol=1e-5, rtol=0)

    status, submission = _request(server.url + "predict.csv", csv_text.encode(), "text/csv")
    assert status == 200
    assert submission == "ImageId,Label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(labels, start=1))

    status, health = _request(server.url + "health")
    assert (status, health) == (200, {"status": "ok"})
    status, model = _request(server.url + "model")
    assert status == 200 and model["runs"] == [str(dense_run)]
    assert model["tta_extra_views"] == 0 and model["summaries"][0]["model"] == "dense"


def test_each_bad_request_gets_400_and_one_line_while_serving_goes_on(server, test_images):
    images, csv_text = test_images
    image = images[0].reshape(-1).tolist()
    header, first_row = csv_text.splitlines()[:2]

    def body(images) -> bytes:
        return json.dumps({"images": images}).encode()

    cases = [
        ("predict", b'{"images": [', "application/json", "body is not JSON"),
        ("predict", b"[" * 100_000 + b"]" * 100_000, "application/json", "JSON nested too deeply"),
        ("predict", b'{"pictures": []}', "application/json", 'expected a JSON object {"images": [...]}'),
        ("predict", body([]), "application/json", "non-empty list of images"),
        ("predict", body([image[:700]]), "application/json", "images[0]: a list of 700 items; expected a 28x28"),
        ("predict", body([image, [image[:28]] * 27 + [image[:27]]]), "application/json", "images[1][27]: 27 pixels"),
        ("predict", body([image[:-1] + [256]]), "application/json", "pixel 783 (row 27, column 27): 256 is not an"),
        ("predict", body([image[:-1] + [-1]]), "application/json", "-1 is not an integer 0-255"),
        ("predict", body([image[:-1] + [1.5]]), "application/json", "1.5 is not an integer 0-255"),
        (
            "predict",
            body([image[:5] + ["7"] + image[6:]]),
            "application/json",
            'pixel 5 (row 0, column 5): "7" is not a',
        ),
        ("predict", body([image[:5] + [True] + image[6:]]), "application/json", "true is not a number"),
        ("predict", body([image[:5] + [None] + image[6:]]), "application/json", "null is not a number"),
        ("predict", body([image]), "text/plain", "Content-Type text/plain: /predict takes application/json"),
        ("predict", b" " * (4 << 20) + b"{}", "application/json", "body over the limit of 4,194,304 bytes"),
        ("predict.csv", f"{header}\n{first_row},1\n".encode(), "text/csv", "CSV body: row 1: has 785 columns"),
        ("predict.csv", f"{header}\n{first_row[:-1]}x\n".encode(), "text/csv", "column pixel783"),
        ("predict.csv", f"label,{header}\n".encode(), "text/csv", "unexpected 'label' column"),
        ("predict.csv", f"{header}\n".encode(), "text/csv", "CSV body: no data rows after the header"),
        ("predict.csv", body([image]), "application/json", "/predict.csv takes text/csv"),
    ]
    expected = _predict(server.url, [image])
    for path, payload, content_type, message in cases:
        status, answer = _request(server.url + path, payload, content_type)
        assert status == 400, (path, message, answer)
        assert set(answer) == {"error"} and message in answer["error"] and "\n" not in answer["error"], answer
        assert _predict(server.url, [image]) == expected  # still serving, the same answer
    assert _request(server.url + "nowhere")[0] == 404
    assert _request(server.url + "predict")[0] == 405


def _digit_to_draw(server: Server, mnist_slice) -> tuple[np.ndarray, int]:
    """An official MNIST test image the served model gets right with confidence; not a 1 or a
    7, whose thin strokes the page's broad pen thickens the most against their width."""
    candidates = np.flatnonzero(mnist_slice.is_official_test)[:40]
    answer = _predict(server.url, [mnist_slice.images[i].tolist() for i in candidates])
    for index, label, probabilities in zip(candidates, answer["labels"], answer["probabilities"]):
        if label == mnist_slice.labels[index] and max(probabilities) > 0.95 and label not in (1, 7):
            return mnist_slice.images[index], int(label)
    raise AssertionError("no confidently recognised test digit among the first 40")


def _browser():
    """Playwright's Chromium driver and Debian's chromium, or a skip saying which is missing."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    return sync_api.sync_playwright()


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_the_page_reads_a_digit_drawn_on_its_canvas(server, mnist_slice, tmp_path):
    from PIL import Image

    digit, label = _digit_to_draw(server, mnist_slice)
    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            elsewhere = []  # any request not to this server: the page must make none
            page.on(
                "request", lambda request: None if request.url.startswith(server.url) else elsewhere.append(request.url)
            )
            page.goto(server.url)
            # The digit as strokes: each row's runs of ink, drawn with the mouse at 10 canvas
            # pixels per MNIST pixel.
            pad = page.locator("#pad").bounding_box()
            for y, row in enumerate(digit > 127):
                x = 0
                while x < 28:
                    if not row[x]:
                        x += 1
                        continue
                    end = x
                    while end + 1 < 28 and row[end + 1]:
                        end += 1
                    page.mouse.move(pad["x"] + 10 * x + 5, pad["y"] + 10 * y + 5)
                    page.mouse.down()
                    page.mouse.move(pad["x"] + 10 * end + 5, pad["y"] + 10 * y + 5, steps=2)
                    page.mouse.up()
                    x = end + 1
            page.click("#predict")
            page.locator("#label:not(:empty)").wait_for(timeout=30_000)
            shown = int(page.text_content("#label"))
            bars = [float(page.get_attribute(f"#bar-{d}", "data-probability")) for d in range(10)]
            seen = np.array(
                page.evaluate(
                    "Array.from(document.getElementById('preview').getContext('2d')"
                    ".getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))"
                )
            )
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # The upload: the same digit as a 28x28 PNG, then the slice's first rows as a CSV.
            Image.fromarray(digit).save(tmp_path / "digit.png")
            page.click("#clear")
            page.evaluate("document.getElementById('label').textContent = ''")  # to see the next answer come
            page.set_input_files("#file", str(tmp_path / "digit.png"))
            page.locator("#label:not(:empty)").wait_for(timeout=30_000)
            uploaded = int(page.text_content("#label"))
            rows = [",".join(f"pixel{i}" for i in range(784))] + [",".join(map(str, digit.reshape(-1)))] * 3
            (tmp_path / "three.csv").write_text("\n".join(rows) + "\n")
            page.set_input_files("#file", str(tmp_path / "three.csv"))
            page.wait_for_selector("#csv-result:not([hidden])", timeout=30_000)
            submission = page.text_content("#csv-result")
            page.screenshot(path=str(tmp_path / "page-after-uploads.png"), full_page=True)
        finally:
            browser.close()
    assert shown == label, f"drew a {label}, the page shows {shown} (screenshot: {tmp_path / 'page.png'})"
    assert abs(sum(bars) - 1) < 1e-3 and int(np.argmax(bars)) == shown
    # The page's 28x28 is MNIST-like: the redrawn digit lies where the original's ink is.
    assert np.corrcoef(seen, digit.reshape(-1).astype(float))[0, 1] > 0.6
    assert uploaded == label
    assert submission == f"ImageId,Label\n1,{label}\n2,{label}\n3,{label}\n"
    assert not elsewhere


def test_a_swap_under_load_drops_nothing_and_answers_as_digits_predict(
    server, dense_run, cnn_run, shared_ray_env, test_images, tmp_path, ray_local
):
    from digit_models.config import PredictConfig
    from digit_models.scoring.predict import predict

    images, csv_text = test_images
    few = 200
    (tmp_path / "few.csv").write_text("\n".join(csv_text.splitlines()[: few + 1]) + "\n")
    predict(
        PredictConfig(
            runs=[str(dense_run), str(cnn_run)],
            input=str(tmp_path / "few.csv"),
            out=str(tmp_path / "scored"),
            tta=2,
            actors=1,
            cpus_per_actor=1,
        )
    )
    labels, probabilities = _scored(tmp_path / "scored")

    statuses, stop = [], threading.Event()

    def load(offset: int) -> None:
        while not stop.is_set():
            status, _ = _request(server.url + "predict", json.dumps({"images": [images[offset].tolist()]}).encode())
            statuses.append(status)

    threads = [threading.Thread(target=load, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    try:
        swapped = run_digits(
            "serve", "--swap", str(dense_run), "--swap", str(cnn_run), "--tta", "2", "--cpus-per-replica", "0",
            env=shared_ray_env,
        )  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert swapped.returncode == 0, swapped.stderr
    assert "swapped: the server now answers with" in swapped.stdout
    assert len(statuses) > 20 and set(statuses) == {200}, statuses

    status, model = _request(server.url + "model")
    assert model["runs"] == [str(dense_run), str(cnn_run)] and model["tta_extra_views"] == 2
    answer = _predict(server.url, images[:few].tolist())
    assert answer["labels"] == labels.tolist()
    np.testing.assert_allclose(np.array(answer["probabilities"]), probabilities, atol=1e-5, rtol=0)


def test_sigterm_finishes_the_request_in_flight_then_leaves_no_serve(server, test_images, ray_local):
    import ray

    images, _ = test_images
    with ThreadPoolExecutor(1) as pool:
        # The ensemble with TTA (after the swap above) takes seconds over these images.
        in_flight = pool.submit(_predict, server.url, images[:1000].tolist(), 120)
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        answer = in_flight.result()
    assert len(answer["labels"]) == 1000
    assert server.process.wait(timeout=120) == 143
    log = server.log.read_text()
    assert log.rstrip().endswith("digits: terminated"), log
    assert "Traceback" not in log and "ERROR" not in log, log
    named = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
    assert not {name for name in named if name.startswith("SERVE_")}, named
