"""The rewards of the RL stages (glimage.train.rewards): the registry and its spec forms, partial credit of the
shapes checker and of OCR, the reward server protocol, and clear errors for bad rewards (NaN, wrong length,
HTTP errors, unreachable servers)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from glimage.data.shapes import render_sample
from glimage.eval.shapes import edit_distance, partial_score, tesseract_available, word_score
from glimage.train.rewards import (REWARDS, HTTPReward, RewardError, register_reward, resolve_reward,
                                   score_images)

IMAGES = [Image.new("RGB", (8, 8), (255 * (i % 2), 0, 0)) for i in range(4)]
PROMPTS = [f"p{i}" for i in range(4)]
META = [{} for _ in range(4)]


def redness(images, prompts, metadata):
    return [float(np.asarray(im, np.float32)[..., 0].mean() / 255) for im in images]


def test_registry_weighted_sums_and_imported_functions(tmp_path, monkeypatch):
    register_reward("t_red")(redness)
    register_reward("t_one")(lambda images, prompts, metadata: [1.0] * len(images))
    assert REWARDS["t_red"] is redness and resolve_reward("t_red") is redness
    both = resolve_reward("0.25 * t_red + 2 * t_one")
    assert both(IMAGES, PROMPTS, META) == pytest.approx([2.0, 2.25, 2.0, 2.25])
    assert resolve_reward("t_red + t_one")(IMAGES, PROMPTS, META) == pytest.approx([1, 2, 1, 2])
    (tmp_path / "my_rewards.py").write_text("def half(images, prompts, metadata):\n    return [0.5] * len(images)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards:half")(IMAGES, PROMPTS, META) == [0.5] * 4
    for bad, msg in [("nope", "must be one of"), ("my_rewards:missing", "cannot be imported"),
                     ("0.5 * t_red + 2x", "is not `weight \\* name`"), ("", "must be a reward name")]:
        with pytest.raises(RewardError, match=msg):
            resolve_reward(bad)
    assert isinstance(resolve_reward("http://127.0.0.1:1/score"), HTTPReward)


def test_bad_scores_get_a_clear_error():
    for fn, msg in [(lambda i, p, m: [1.0, float("nan"), 0.0, 1.0], r"non-finite score nan for image 1 \(prompt 'p1'\)"),
                    (lambda i, p, m: [1.0] * 3, "returned 3 scores for 4 images"),
                    (lambda i, p, m: ["good"] * 4, "must return numbers"),
                    (lambda i, p, m: [float("inf")] * 4, "4 of 4 are not finite")]:
        with pytest.raises(RewardError, match=msg):
            score_images(fn, IMAGES, PROMPTS, META)
    with pytest.raises(RewardError, match="non-finite"):  # a weighted sum checks each term
        register_reward("t_nan")(lambda i, p, m: [float("nan")] * len(i))
        score_images(resolve_reward("t_nan + 1 * t_nan"), IMAGES, PROMPTS, META)
    assert score_images(redness, IMAGES, PROMPTS, META).tolist() == [0.0, 1.0, 0.0, 1.0]


class _Server:
    """A reward server answering each POST with the next (status, body) of `answers` (the last one repeats)."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body = outer.answers.pop(0) if len(outer.answers) > 1 else outer.answers[0]
                if callable(body):
                    body = body(outer.requests[-1])
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_reward_server_protocol_retries_and_errors():
    ok = _Server([(200, lambda req: {"scores": [len(p) for p in req["prompts"]]})])
    try:
        scores = score_images(resolve_reward(ok.url), IMAGES, ["a", "bb", "ccc", "dddd"], [{"word": "X"}] * 4)
        assert scores.tolist() == [1, 2, 3, 4]
        req = ok.requests[0]
        assert req["metadata"][0] == {"word": "X"} and len(req["images"]) == 4
        import base64
        import io
        assert Image.open(io.BytesIO(base64.b64decode(req["images"][1]))).getpixel((0, 0)) == (255, 0, 0)
    finally:
        ok.close()
    flaky = _Server([(503, "busy"), (200, {"scores": [0.5] * 4})])  # a 5xx is retried
    try:
        assert HTTPReward(flaky.url)(IMAGES, PROMPTS, META) == [0.5] * 4 and len(flaky.requests) == 2
    finally:
        flaky.close()
    for answers, msg in [([(400, "bad prompt")], "answered HTTP 400: bad prompt"),
                         ([(500, "boom")], "answered HTTP 500: boom"),
                         ([(200, "not json")], "must answer JSON"),
                         ([(200, {"score": 1})], "must answer JSON"),
                         ([(200, {"scores": [1.0, None, 1.0, 1.0]})], "must return numbers")]:
        srv = _Server(answers)
        try:
            with pytest.raises(RewardError, match=msg):
                score_images(HTTPReward(srv.url, retries=1), IMAGES, PROMPTS, META)
        finally:
            srv.close()
    with pytest.raises(RewardError, match="unreachable after 2 attempts"):
        HTTPReward("http://127.0.0.1:9/score", timeout=2, retries=1)(IMAGES, PROMPTS, META)


def test_word_partial_credit():
    assert edit_distance("KITTEN", "SITTING") == 3 and edit_distance("", "AB") == 2
    assert word_score("CAT", "CAT") == 1.0 and word_score(None, "CAT") == 0.0 and word_score("", "CAT") == 0.0
    assert word_score("CAT", "CAR") == pytest.approx(2 / 3) and word_score("CATS", "CAT") == pytest.approx(3 / 4)


@pytest.mark.skipif(not tesseract_available(), reason="tesseract-ocr is not installed")
def test_partial_credit_of_the_checker_is_one_exactly_when_it_passes():
    """Ground-truth images score 1 (the checker passes them); a caption they do not match scores in [0, 1),
    more for a near miss (right objects, wrong relation) than for a wrong object."""
    by_template = {}
    for i in range(40):
        image, rec = render_sample("train", 3, i)
        by_template.setdefault(rec["template"], (image, rec))
    for template, (image, rec) in by_template.items():
        assert partial_score(image, rec) == 1.0, template
    image, rec = by_template["left_of"]
    a, b = rec["objects"]
    swapped = partial_score(image, {**rec, "objects": [b, a]})  # both there, the relation reversed
    colours = [c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c not in (a["color"], b["color"])]
    wrong = partial_score(image, {**rec, "objects": [{**a, "color": colours[0]}, {**b, "color": colours[1]}]})
    assert 0 <= wrong < swapped < 1
    image, rec = by_template["sign"]
    near = rec["word"][:-1] + ("A" if rec["word"][-1] != "A" else "B")
    assert partial_score(image, {**rec, "word": near}) == pytest.approx(1 - 1 / len(rec["word"]))
    ocr = REWARDS["ocr"]
    right, other = ocr([image, image], ["", 'a sign that says "XYZW"'], [rec, {}])  # the record's word, the quote
    assert right == 1.0 and other < 1.0
    assert ocr([image], ["a red circle"], [{}]) == [0.0]  # no text asked for: a constant
