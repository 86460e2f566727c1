"""glimage on a local Ray cluster (pip install -e ".[test,ray]"; run with `pytest -m ray`; CI runs them):
the Serve application with the shipped model (the official openai client: generate, edit, stream, auth, 429;
the same images as `glimage serve`; a replica killed under load), and offline batches on Ray Data (equal to
the one-process run; resumed after a kill)."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
from fastapi.testclient import TestClient  # noqa: E402

from glimage.pipeline import GlmImagePipeline  # noqa: E402
from glimage.serve.app import Served, Settings, create_app  # noqa: E402

pytestmark = pytest.mark.ray
KEY = "ray-test-key-0123"
STEPS = 4  # images here need not be good, only equal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs on a 2-core machine: ingress 0, AR 1, two DiT replicas 1 each; every worker one thread
    from glimage.cluster import connect
    os.environ["OMP_NUM_THREADS"] = "1"
    connect("local", num_cpus=4)
    yield ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def app(cluster):
    from ray import serve

    from glimage.cluster.serve import build
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"api_keys": [KEY], "max_queue": 3, "dit": {"num_replicas": 2}}), name="glimage",
              route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("glimage")


@pytest.fixture(scope="module")
def local():
    """`glimage serve` in this process, single-threaded as the replicas are."""
    torch.set_num_threads(1)
    pipe = GlmImagePipeline.from_pretrained(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    with TestClient(create_app(Settings(), Served("glimage-shapes", pipe))) as c:
        yield c


def client(url, key=KEY, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def source_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (128, 128, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_generate_and_edit_equal_glimage_serve(app, local):
    c = client(app)
    got = c.images.generate(prompt="a red circle at the top", n=2, extra_body={"seed": 11, "num_inference_steps": STEPS})
    want = local.post("/v1/images/generations", json={"prompt": "a red circle at the top", "n": 2, "seed": 11,
                                                       "num_inference_steps": STEPS}).json()
    for g, w in zip(got.data, want["data"]):
        assert np.array_equal(pixels(base64.b64decode(g.b64_json)), pixels(base64.b64decode(w["b64_json"])))
    edit = c.images.edit(image=("src.png", source_png(), "image/png"), prompt="make it blue",
                         extra_body={"seed": 5, "num_inference_steps": str(STEPS)})
    want = local.post("/v1/images/edits", files={"image": ("src.png", source_png(), "image/png")},
                      data={"prompt": "make it blue", "seed": "5", "num_inference_steps": str(STEPS)}).json()
    assert np.array_equal(pixels(base64.b64decode(edit.data[0].b64_json)),
                          pixels(base64.b64decode(want["data"][0]["b64_json"])))
    assert c.models.list().data[0].id == "glimage-shapes"


def test_stream_partial_images(app):
    events = list(client(app).images.generate(prompt="a blue square", stream=True, partial_images=2,
                                              extra_body={"seed": 1, "num_inference_steps": STEPS}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert pixels(base64.b64decode(events[-1].b64_json)).shape == (128, 128, 3)


def test_client_gone_stops_the_denoising(app):
    """Two long streams occupy both DiT replicas; their clients leave after the first partial image. If the
    cancellation did not reach the replicas, a short request would wait ~5 s for one to finish its image."""
    import httpx

    def leave_early(seed):
        body = {"prompt": "a red circle", "seed": seed, "stream": True, "partial_images": 3,
                "num_inference_steps": 150}  # ~6 s of denoising; the first partial image after ~1.5 s
        with httpx.stream("POST", f"{app}/v1/images/generations", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if "partial_image" in line:
                    return True
        return False

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(leave_early, (1, 2)))
    t0 = time.monotonic()
    client(app).images.generate(prompt="a blue circle", extra_body={"seed": 3, "num_inference_steps": STEPS})
    assert time.monotonic() - t0 < 3


def test_auth_and_bad_request(app):
    with pytest.raises(openai.AuthenticationError):
        client(app, key="wrong-key-000000").images.generate(prompt="a red circle")
    with pytest.raises(openai.BadRequestError, match="size"):
        client(app).images.generate(prompt="a red circle", size="100x100")


def test_queue_full_is_429_with_retry_after(app):
    import httpx

    def one(i):
        return httpx.post(f"{app}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                          json={"prompt": "a green triangle", "seed": i, "num_inference_steps": 20})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 3 and 429 in codes, codes  # max_queue 3: the rest are refused, none lost
    assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 429)
    assert set(codes) <= {200, 429}


def replicas(stage: str) -> list:
    from ray.util import list_named_actors
    names = [a["name"] for a in list_named_actors(all_namespaces=True) if f"#{stage}#" in a["name"]]
    return [ray.get_actor(n, namespace="serve") for n in names]


class Fake:
    """A deployment handle whose calls fail with a dead replica `fails` times, then answer `result`."""

    def __init__(self, result, fails: int):
        self.result_, self.fails, self.calls = result, fails, 0
        self.draw = self

    def options(self, **kw):
        return self

    def remote(self, job):
        self.calls += 1
        dead = self.calls <= self.fails
        fake = self

        class Response:
            def result(self):
                if dead:
                    raise ray.exceptions.RayActorError()
                return fake.result_

            def __iter__(self):
                if dead:
                    yield {"event": "partial", "index": 0, "partial_index": 0, "image": "early"}
                    raise ray.exceptions.RayActorError()
                yield from fake.result_

            def cancel(self):
                pass
        return Response()


@pytest.mark.parametrize("dit_fails, want", [(1, "image"), (2, "error")])
def test_engine_retries_a_dead_replica_then_answers_503(dit_fails, want):
    """RayEngine alone, with fake handles: a DiT call whose replica dies is drawn again (its partial image
    not sent twice); when every try fails (retries=1: two), the request ends with 503 + Retry-After."""
    from glimage.cluster.engine import RayEngine
    from glimage.serve.engine import Request

    prior = {"prior": torch.zeros(1, 4, dtype=torch.long), "source_ids": None, "source_grids": None}
    dit = Fake([{"event": "partial", "index": 0, "partial_index": 0, "image": "again"},
                {"event": "image", "index": 0, "image": "img"}], dit_fails)
    engine = RayEngine(Fake(prior, 1), dit, max_queue=2, retries=1)
    engine.start()
    events, done = [], threading.Event()
    req = Request("a red circle", 128, 128, 4, 3.0, 0, partial_images=1,
                  sink=lambda ev: (events.append(ev), ev["event"] in ("done", "error") and done.set()))
    engine.submit(req)
    assert done.wait(30)
    engine.stop()
    kinds = [ev["event"] for ev in events]
    assert kinds == (["partial", "image", "done"] if want == "image" else ["partial", "error"]), events
    if want == "error":
        assert events[-1]["status"] == 503 and events[-1]["retry_after"] == 5 and "replicas lost" in events[-1]["message"]
    assert dit.calls == 2 and not engine.admitted


def failures(url: str, stage: str) -> float:
    import httpx
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    line = [ln for ln in text.splitlines() if ln.startswith(f'glimage_replica_failures_total{{stage="{stage}"}}')]
    return float(line[0].split()[-1]) if line else 0.0


@pytest.mark.parametrize("stage", ["dit", "ar"])
def test_replica_killed_under_load(app, stage):
    """A replica killed while it works: every admitted request completes (its image drawn again on another
    replica) or is answered 503 + Retry-After; /health says degraded; the controller replaces the replica."""
    import httpx

    def one(i):
        return httpx.post(f"{app}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=180,
                          json={"prompt": "a red square", "seed": 100 + i, "n": 2, "num_inference_steps": 40})
    before = failures(app, stage)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one, i) for i in range(3)]
        time.sleep(2.0 if stage == "dit" else 0.2)  # the DiTs are denoising / the AR is drawing
        ray.kill(replicas(stage)[0], no_restart=False)
        answers = [f.result() for f in futures]
    for r in answers:
        assert r.status_code in (200, 503), (r.status_code, r.text)
        if r.status_code == 503:
            assert "retry-after" in r.headers and "replica" in r.json()["error"]["message"]
        else:
            assert len(r.json()["data"]) == 2
    assert sum(r.status_code == 200 for r in answers) >= 2
    assert failures(app, stage) > before  # the kill hit a call in flight, and it was retried
    health = httpx.get(f"{app}/health").json()
    assert health["status"] == "degraded" and stage in health["stages"], health
    deadline = time.time() + 90  # the controller brings the replica back, and the app serves again
    while httpx.get(f"{app}/health").json()["stages"][stage]["replicas"].get("RUNNING", 0) < \
            (2 if stage == "dit" else 1):
        assert time.time() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    ok = client(app).images.generate(prompt="a red circle", extra_body={"seed": 1, "num_inference_steps": STEPS})
    assert len(ok.data) == 1


PROMPTS = [f"a {c} {s} at the {p}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")
           for p in ("top", "bottom", "left", "right")] * 2  # 64


def write_prompts(path: Path) -> Path:
    lines = [json.dumps({"prompt": p, "num_inference_steps": STEPS}) for p in PROMPTS]
    path.write_text("\n".join(lines) + "\n")
    return path


def generate(*args, check=True, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "glimage.cli", "generate", *args, "-q"], env=env, check=check,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    prompts = write_prompts(tmp / "prompts.jsonl")
    generate("--prompts", str(prompts), "--out", str(tmp / "one"), "--threads", "1")
    return prompts, tmp / "one"


def same_folders(a: Path, b: Path) -> None:
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    for row in map(json.loads, (a / "metadata.jsonl").read_text().splitlines()):
        assert np.array_equal(pixels((a / row["file_name"]).read_bytes()), pixels((b / row["file_name"]).read_bytes())), row


def test_offline_batch_on_ray_equals_one_process(one_process, tmp_path):
    prompts, want = one_process
    assert len((want / "metadata.jsonl").read_text().splitlines()) == 64
    generate("--prompts", str(prompts), "--out", str(tmp_path / "ray"), "--ray", "--dit-actors", "2")
    same_folders(want, tmp_path / "ray")


def test_offline_batch_resumes_after_kill(one_process, tmp_path):
    prompts, want = one_process
    out = tmp_path / "ray"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glimage.cli", "generate", "--prompts", str(prompts), "--out",
                             str(out), "--ray", "--dit-actors", "2", "-q"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(out.glob("*.png"))) < 10:
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before 10 images"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    proc.wait()
    done = len(list(out.glob("*.png")))
    assert 10 <= done < 64 and not (out / "metadata.jsonl").exists()
    r = subprocess.run([sys.executable, "-m", "glimage.cli", "generate", "--prompts", str(prompts), "--out", str(out),
                        "--ray", "--dit-actors", "2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{64 - done} image(s) drawn, {done} already there" in r.stderr
    same_folders(want, out)


def test_offline_batch_on_two_nodes(one_process, tmp_path):
    """A two-node cluster (ray.cluster_utils.Cluster): 1 + 2 CPUs for an AR and two DiT actors, so the pools
    span both nodes; the images come back to the driver and equal the one-process run's."""
    from ray.cluster_utils import Cluster

    _, want = one_process
    prompts = write_prompts(tmp_path / "p.jsonl")
    lines = prompts.read_text().splitlines()[:16]
    prompts.write_text("\n".join(lines) + "\n")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # workers: one torch thread each
    try:
        nodes.add_node(num_cpus=2)
        nodes.wait_for_nodes()
        generate("--prompts", str(prompts), "--out", str(tmp_path / "out"), "--ray", nodes.address,
                 "--dit-actors", "2")
    finally:
        nodes.shutdown()
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:
        assert np.array_equal(pixels((tmp_path / "out" / row["file_name"]).read_bytes()),
                              pixels((want / row["file_name"]).read_bytes())), row


def test_config_files_build_and_bad_args_are_named():
    """examples/ray/serve.yaml and the KubeRay example's serveConfigV2 build; a misspelt argument or stage
    option is refused naming what is allowed (no cluster needed)."""
    import yaml

    from glimage.cluster.serve import build, config_args
    from glimage.validate import InputError

    root = Path(__file__).resolve().parents[1] / "examples" / "ray"
    assert build(config_args(str(root / "serve.yaml"))) is not None
    service = yaml.safe_load((root / "rayservice.yaml").read_text())
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert build(args) is not None
    with pytest.raises(InputError, match="did you mean 'max_queue'"):
        build({"max_queu": 4})
    with pytest.raises(InputError, match="num_replica.*allowed: num_replicas"):
        build({"dit": {"num_replica": 2}})
    with pytest.raises(InputError, match="max_n"):
        build({"max_n": 0})


def test_engine_lost_ar_replica_fails_only_its_requests():
    """Two requests in one AR batch; the AR calls die three times (retries=1: two tries each): the first
    request's image finds no live replica (503 + Retry-After), the second's answer on the retry is used."""
    from glimage.cluster.engine import RayEngine
    from glimage.serve.engine import Request

    prior = {"prior": torch.zeros(1, 4, dtype=torch.long), "source_ids": None, "source_grids": None}
    engine = RayEngine(Fake(prior, 3), Fake([{"event": "image", "index": 0, "image": "img"}], 0), max_queue=4,
                       retries=1)
    ends = {}
    done = {0: threading.Event(), 1: threading.Event()}

    def sink(seed):
        return lambda ev: ev["event"] in ("done", "error") and (ends.__setitem__(seed, ev), done[seed].set())
    for seed in (0, 1):
        engine.submit(Request("a red circle", 128, 128, 4, 3.0, seed, sink=sink(seed)))  # before the AR worker
    engine.start()  # starts: both in one batch
    assert done[0].wait(30) and done[1].wait(30)
    engine.stop()
    assert ends[0]["event"] == "error" and ends[0]["status"] == 503 and ends[0]["retry_after"] == 5
    assert ends[1]["event"] == "done"


def test_glimage_serve_ray_command(tmp_path):
    """The command line: `glimage serve --ray --ray-config FILE` starts its own local cluster, takes the file's
    stage options and the command's limits, answers, and exits 0 on SIGTERM."""
    import httpx

    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"applications": [{"name": "glimage", "import_path": "glimage.cluster.serve:build",
                                                    "args": {"max_n": 1, "dit": {"ray_actor_options": {"num_cpus": 0.5}},
                                                             "ar": {"ray_actor_options": {"num_cpus": 0.5}}}}]}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glimage.cli", "serve", "--ray", "--ray-config", str(config),
                             "--port", str(port), "--max-n", "2", "--api-key", KEY], start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "glimage serve --ray did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "ready":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        c = client(f"http://127.0.0.1:{port}")
        assert len(c.images.generate(prompt="a red circle", n=2, extra_body={"num_inference_steps": STEPS}).data) == 2
        with pytest.raises(openai.BadRequestError, match="n"):  # --max-n 2 over the file's max_n 1
            c.images.generate(prompt="a red circle", n=3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-2000:]
