"""`glimage serve` as users run it: a real server process on 127.0.0.1 with the shipped model, the official
`openai` client, a load of 32 clients against a queue of 8, SIGTERM draining, and a real browser (Debian's
Chromium driven by Playwright; skipped where no Chromium is installed)."""

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "live-test-key-42424242"
FAST = {"num_inference_steps": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CLI's images below are drawn with one thread too
    proc = subprocess.Popen([sys.executable, "-m", "glimage.cli", "serve", "--port", str(port), "--log-level",
                             "warning", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not become ready")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    proc, url = start("--api-key", KEY, "--max-cost", "1000")  # the disconnect test's 1000 steps cost 50
    yield url
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_generate_b64_url_n_and_size(client):
    r = client.images.generate(prompt="a red circle", n=2, size="128x128", extra_body=FAST)
    a, b = (decode(d.b64_json) for d in r.data)
    assert a.shape == (128, 128, 3) and not np.array_equal(a, b)  # two independent draws
    r = client.images.generate(prompt="a blue square", response_format="url", size="96x64", extra_body=FAST)
    img = Image.open(io.BytesIO(httpx.get(r.data[0].url).content))
    assert img.size == (96, 64)


def test_seeded_request_equals_the_cli(client, tmp_path):
    r = client.images.generate(prompt='a sign that says "HI"', extra_body={"seed": 7, **FAST})
    out = tmp_path / "cli.png"
    subprocess.run([sys.executable, "-m", "glimage.cli", "generate", 'a sign that says "HI"', "--seed", "7", "--steps",
                    "4", "-o", str(out), "-q"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert np.array_equal(decode(r.data[0].b64_json), np.asarray(Image.open(out).convert("RGB")))


def test_edit_with_one_and_two_sources(client):
    src = io.BytesIO(base64.b64decode(client.images.generate(prompt="a green square", extra_body=FAST).data[0].b64_json))
    one = client.images.edit(image=("a.png", src.getvalue(), "image/png"), prompt="make it red", extra_body=FAST)
    two = client.images.edit(image=[("a.png", src.getvalue(), "image/png"), ("b.png", src.getvalue(), "image/png")],
                             prompt="make it red", extra_body=FAST)
    assert decode(one.data[0].b64_json).shape == decode(two.data[0].b64_json).shape == (128, 128, 3)


def test_stream_partial_images_then_completed(client):
    events = list(client.images.generate(prompt="a red circle", stream=True, partial_images=2,
                                         extra_body={"num_inference_steps": 8}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1] and decode(events[-1].b64_json).shape[2] == 3
    edit = list(client.images.edit(image=("a.png", base64.b64decode(events[-1].b64_json), "image/png"),
                                   prompt="x", stream=True, partial_images=1, extra_body=FAST))
    assert [e.type for e in edit] == ["image_edit.partial_image", "image_edit.completed"]


def test_client_exceptions(client, server):
    with pytest.raises(openai.BadRequestError, match="height=100"):
        client.images.generate(prompt="x", size="100x100")
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(image=("a.png", b"x", "image/png"), mask=("m.png", b"x", "image/png"), prompt="x")
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="dall-e-3")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_load_32_clients_against_a_queue_of_8():
    """Three waves of 32 concurrent requests: no 5xx; 429s at once with Retry-After (the official client raises
    RateLimitError); every admitted request completes with a valid image; memory flat across the waves."""
    proc, url = start("--max-queue", "8")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def one(i, out):
            t0 = time.perf_counter()
            try:
                r = client.images.generate(prompt=f"a red circle {i % 4}", extra_body={"seed": i, **FAST})
                out.append(("ok", time.perf_counter() - t0, decode(r.data[0].b64_json).shape))
            except openai.RateLimitError as e:
                out.append(("429", time.perf_counter() - t0, e.response.headers.get("retry-after")))
            except openai.APIStatusError as e:
                out.append((str(e.status_code), time.perf_counter() - t0, None))

        rss, waves = [], []
        for wave in range(3):
            out = []
            threads = [threading.Thread(target=one, args=(wave * 32 + i, out)) for i in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            waves.append(out)
            rss.append(rss_mb(proc.pid))
        for out in waves:
            kinds = [k for k, _, _ in out]
            assert set(kinds) <= {"ok", "429"}, kinds  # no 5xx, nothing else
            assert kinds.count("ok") >= 8 and kinds.count("429") >= 1
            assert all(shape == (128, 128, 3) for k, _, shape in out if k == "ok")
            assert all(ra and int(ra) >= 1 and t < 2.0 for k, t, ra in out if k == "429")
        assert rss[2] - rss[0] < 64, rss  # MiB: no growth per wave
        lat = sorted(t for out in waves for k, t, _ in out if k == "ok")
        print(f"\nload: admitted {len(lat)}/96, p50 {np.percentile(lat, 50):.2f} s, p95 {np.percentile(lat, 95):.2f} s, "
              f"RSS {rss[0]:.0f} -> {rss[2]:.0f} MiB")
    finally:
        assert stop(proc) == 0


def test_sigterm_drains_a_running_request():
    proc, url = start()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{url}/v1/images/generations", json={"prompt": "a red circle", "num_inference_steps": 60}, timeout=120)))
    t.start()
    for _ in range(200):
        if httpx.get(f"{url}/health").json().get("requests") == 1:
            break
        time.sleep(0.02)
    assert stop(proc) == 0  # SIGTERM: no new connections, the running request finishes
    t.join()
    assert result["r"].status_code == 200 and result["r"].json()["data"][0]["b64_json"]


def test_a_client_that_goes_away_is_dropped(server):
    """A stream closed after its first event: the server stops that request (nothing left admitted soon after),
    long before its 1000 steps would end."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/images/generations", headers=headers, timeout=60,
                      json={"prompt": "a red circle", "stream": True, "progress_events": True,
                            "num_inference_steps": 1000}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # closing the response drops the connection
    for _ in range(100):
        if httpx.get(f"{server}/health").json()["requests"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(f"{server}/health").json()["requests"] == 0
    r = httpx.post(f"{server}/v1/images/generations", headers=headers, timeout=60,
                   json={"prompt": "a red circle", **FAST})
    assert r.status_code == 200  # and the server serves on


def test_non_loopback_without_a_key_refuses_to_start():
    r = subprocess.run([sys.executable, "-m", "glimage.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--allow-no-key" in r.stderr and "Traceback" not in r.stderr


def test_a_port_in_use_fails_before_the_banner():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "glimage.cli", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "glimage serve: http" not in r.stdout and "Traceback" not in r.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium); .ci/run installs it")
def test_the_page_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    src = tmp_path / "src.png"
    Image.new("RGB", (128, 128), (40, 90, 200)).save(src)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server)
        page.click("summary")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        # (locators and expect, not wait_for_function: the page's CSP forbids the eval that would need)
        expect(page.locator("#model")).to_contain_text("glimage-shapes")
        page.fill("#prompt", 'a sign that says "HI"')
        page.fill("#steps", "12")
        page.fill("#n", "2")
        page.click("#go")
        expect(page.locator("#progress")).to_be_visible()
        expect(page.locator("#gallery figure")).to_have_count(2, timeout=60000)
        assert page.locator("#previews img").count() >= 2  # the streamed previews
        assert page.locator("#progress").evaluate("e => e.value") == 1
        assert page.locator("#gallery a[download]").count() == 2
        page.screenshot(path=str(tmp_path / "page.png"))
        # edit mode: upload a source image
        page.click("#tab-edit")
        page.set_input_files("#images", str(src))
        page.fill("#prompt", "make it red")
        page.fill("#n", "1")
        page.click("#go")
        expect(page.locator("#gallery figure")).to_have_count(3, timeout=60000)
        if os.environ.get("GLIMAGE_SCREENSHOT"):  # docs/serve.png: GLIMAGE_SCREENSHOT=docs/serve.png pytest -k browser
            page.screenshot(path=os.environ["GLIMAGE_SCREENSHOT"], full_page=True)
        # errors are shown readably
        page.fill("#size", "100x100")
        page.click("#go")
        expect(page.locator("#error")).to_contain_text("height=100")
        browser.close()
    assert not [e for e in errors if "Failed to load resource" not in e], errors
