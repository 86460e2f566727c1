"""Rewards of the RL stages: functions `(images, prompts, metadata) -> scores`, one float per image.

    images    PIL images, as the pipeline returns them
    prompts   the caption each image was drawn from
    metadata  one dict per image: the data record of its caption (a `glimage data shapes` record: template,
              objects, position, word), {} where the data has none

A reward is named in a recipe (`reward = ...`) by one of:
    a registered name          "shapes", "shapes_partial", "ocr"          (REWARDS; `register_reward` adds one)
    a weighted sum             "0.7 * shapes_partial + 0.3 * ocr"
    an importable function     "mypackage.rewards:aesthetic"              (a user's own, no change to glimage)
    a reward server            "http://host:8000/score"                   (HTTPReward: HPSv3, PickScore, a VLM judge)
`resolve_reward(spec)` turns it into a function and `score_images` calls it and checks what comes back: one finite
number per image, or a RewardError that names the reward and the bad value (never a silent NaN in the loss).
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
import re
import time
import urllib.error
import urllib.request
from typing import Callable

import torch

from ..glyph_text import glyph_texts
from ..validate import InputError

Reward = Callable[[list, list[str], list[dict]], list[float]]
REWARDS: dict[str, Reward] = {}


class RewardError(InputError):
    """A reward that cannot be used: unknown, unreachable, or returning something other than one finite
    number per image."""


def register_reward(name: str):
    """Decorator: make `fn(images, prompts, metadata) -> scores` available to recipes as `reward = "<name>"`."""
    def add(fn: Reward) -> Reward:
        REWARDS[name] = fn
        return fn
    return add


@register_reward("shapes")
def shapes_reward(images, prompts, metadata) -> list[float]:
    """1 when the shapes checker passes the image for its record (the evaluation's own criterion), else 0."""
    from ..eval.shapes import check
    return [float(check(im, rec)[0]) for im, rec in zip(images, metadata)]


@register_reward("shapes_partial")
def shapes_partial_reward(images, prompts, metadata) -> list[float]:
    """The checker with partial credit (glimage.eval.shapes.partial_score): 1 when it passes, else the share of
    what the caption asks for that is there -- a denser signal than pass/fail for groups that all fail."""
    from ..eval.shapes import partial_score
    return [partial_score(im, rec) for im, rec in zip(images, metadata)]


@register_reward("ocr")
def ocr_reward(images, prompts, metadata) -> list[float]:
    """Word accuracy with partial credit (edit distance) of the sign Tesseract reads. The wanted word is the
    record's `word`, else the prompt's quoted text; prompts asking for no text score 0 (a constant within a
    group: no advantage either way)."""
    from ..eval.shapes import read_sign, word_score
    out = []
    for im, prompt, rec in zip(images, prompts, metadata):
        want = rec.get("word") or " ".join(glyph_texts(prompt)).strip().upper()
        out.append(word_score(read_sign(im), want) if want else 0.0)
    return out


class HTTPReward:
    """A reward computed by a server: POST {"prompts", "metadata", "images": [base64 PNG]} as JSON to `url`,
    answer {"scores": [float, ...]}. Connection errors and 5xx answers are retried `retries` times with
    backoff; a 4xx answer, a timeout after the retries or a malformed answer raise RewardError."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 2):
        self.url, self.timeout, self.retries = url, timeout, retries

    def __call__(self, images, prompts, metadata) -> list[float]:
        pngs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        body = json.dumps({"prompts": list(prompts), "metadata": list(metadata), "images": pngs}).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as res:
                    answer = res.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code < 500 or attempt == self.retries:
                    raise RewardError(f"reward server {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RewardError(f"reward server {self.url} is unreachable after {self.retries + 1} "
                                      f"attempts: {getattr(e, 'reason', e)}") from None
            time.sleep(0.5 * 2 ** attempt)
        try:
            scores = json.loads(answer)["scores"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(f"reward server {self.url} must answer JSON {{\"scores\": [...]}}, got "
                              f"{answer[:200]!r}") from None
        return scores


_TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([A-Za-z_][\w.:]*)\s*$")


def resolve_reward(spec: str | Reward, timeout: float = 120.0) -> Reward:
    """A recipe's `reward` value -> the reward function (see the module's docstring for the forms)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward={spec!r} must be a reward name, a weighted sum, module:function or a URL")
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return HTTPReward(spec, timeout)
    if "+" in spec or "*" in spec:
        terms = []
        for part in spec.split("+"):
            m = _TERM.match(part)
            if not m:
                raise RewardError(f"reward={spec!r}: {part.strip()!r} is not `weight * name`")
            terms.append((float(m.group(1) or 1.0), resolve_reward(m.group(2), timeout)))
        return weighted(terms)
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RewardError(f"reward={spec!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise RewardError(f"reward={spec!r} is not a function")
        return fn
    raise RewardError(f"reward={spec!r} must be one of {sorted(REWARDS)}, a weighted sum of them "
                      f"('0.7 * shapes_partial + 0.3 * ocr'), module:function or an http(s) URL")


def weighted(terms: list[tuple[float, Reward]]) -> Reward:
    """sum_k w_k r_k(images, prompts, metadata), each term checked on its own."""
    def reward(images, prompts, metadata):
        total = torch.zeros(len(images), dtype=torch.float64)
        for w, fn in terms:
            total += w * score_images(fn, images, prompts, metadata).double()
        return total.tolist()
    return reward


def score_images(reward: Reward, images: list, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Call the reward and check its answer: (N,) float32, one finite number per image, or RewardError."""
    name = getattr(reward, "__name__", None) or getattr(reward, "url", None) or type(reward).__name__
    scores = reward(images, prompts, metadata)
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().flatten().tolist()
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise RewardError(f"reward {name} must return numbers, got {str(scores)[:200]}") from None
    if len(scores) != len(images):
        raise RewardError(f"reward {name} returned {len(scores)} scores for {len(images)} images")
    bad = [(i, s) for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        i, s = bad[0]
        raise RewardError(f"reward {name} returned a non-finite score {s} for image {i} (prompt "
                          f"{prompts[i]!r}); {len(bad)} of {len(scores)} are not finite")
    return torch.tensor(scores, dtype=torch.float32)
