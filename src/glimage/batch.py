"""Offline batch generation: `glimage generate --prompts FILE.jsonl --out DIR`.

Each line of FILE.jsonl is one image: {"prompt": ..., and optionally "seed", "size" ("WxH") or "height" and
"width", "num_inference_steps", "guidance_scale", "image" (source path(s) for an edit, relative to the file),
"file_name"}; other keys are carried into metadata.jsonl untouched. A line without "seed" takes --seed + its
line index, so an image never depends on which others ran, in what order, or where.

DIR ends in the Hugging Face imagefolder layout: the images, and metadata.jsonl with one row per line of
FILE.jsonl (`datasets.load_dataset("imagefolder", data_dir=DIR)`). An image is written atomically the moment
it is finished and carries its parameters (`glimage info`); a rerun after a crash skips every image already
there (and refuses one made from another prompt or seed), so nothing finished is drawn twice.

The images are those of `glimage generate PROMPT --seed S` (stages.py: the AR, then the DiT, one image at a
time), in one process here and on Ray Data with glimage.cluster.data (`--ray`): the same seeds give the same
images.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import __version__
from .validate import MAX_GUIDANCE, InputError, check_float, check_int, check_prompt, check_seed, check_target_size, parse_size

KEYS = ("prompt", "seed", "size", "height", "width", "num_inference_steps", "guidance_scale", "image", "file_name")
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Job:
    index: int  # line of the prompts file (0-based, blank lines not counted)
    prompt: str
    seed: int
    height: int
    width: int
    steps: int
    guidance: float
    file_name: str  # relative to the output folder
    sources: tuple = ()  # (name, bytes) of an edit's source images: read once, sent to wherever the AR runs
    extra: dict = field(default_factory=dict)  # the line's other keys, for metadata.jsonl

    def settings(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "height": self.height, "width": self.width,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance}

    def params(self, model: str) -> dict:
        """The parameters embedded in the image, as `glimage generate` writes them."""
        images = {"images": [name for name, _ in self.sources]} if self.sources else {}
        return {**self.settings(), "model": model, **images}

    def metadata(self) -> dict:
        return {"file_name": self.file_name, **self.settings(), **self.extra}


def read_jobs(path: str | os.PathLike, card, seed: int = 0, steps: int | None = None,
              guidance: float | None = None, size: str | None = None) -> list[Job]:
    """Every line of a prompts file, checked against the model (card: glimage.card.ModelCard) before anything
    loads; an error names the line and the value. steps/guidance/size: defaults for lines that set none."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {str(path)!r}: {getattr(e, 'strerror', None) or e}", "prompts") from None
    jobs, names = [], {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not a JSON object ({e})", "prompts") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: each line must be a JSON object with a \"prompt\"", "prompts")
        for key in rec:
            near = difflib.get_close_matches(key, KEYS, 1, 0.8)
            if key not in KEYS and near:
                raise InputError(f"{where}: unknown key {key!r}; did you mean {near[0]!r}?", "prompts")
        try:
            jobs.append(_job(len(jobs), rec, path.parent, card, seed, steps, guidance, size))
        except InputError as e:
            raise InputError(f"{where}: {e}", "prompts") from None
        name = jobs[-1].file_name
        if name in names:
            raise InputError(f"{where}: file_name {name!r} is also line {names[name]}'s", "prompts")
        names[name] = lineno
    if not jobs:
        raise InputError(f"--prompts {str(path)!r} has no prompts", "prompts")
    return jobs


def _job(index: int, rec: dict, base: Path, card, seed0, steps, guidance, size) -> Job:
    from .image import image_size

    if "prompt" not in rec:
        raise InputError("\"prompt\" is required")
    prompt = check_prompt(rec["prompt"])
    seed = check_seed(rec["seed"] if rec.get("seed") is not None else seed0 + index)
    paths = rec.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise InputError(f"image={paths!r} must be a path or a list of paths")
    sources = []
    for p in paths:
        f = base / p
        try:
            data = f.read_bytes()
        except OSError as e:
            raise InputError(f"image {p!r}: {e.strerror or e}") from None
        sources.append((Path(p).name, data, image_size(data, f"image {p!r}")))  # the header: nothing decoded yet
    if rec.get("size") is not None or size is not None:
        if rec.get("height") is not None or rec.get("width") is not None:
            raise InputError("give \"size\" or \"height\"/\"width\", not both")
        h, w = parse_size(rec.get("size") or size, "size")
    else:
        h, w = rec.get("height"), rec.get("width")
    if h is None or w is None:
        dh, dw = card.default_size(sources[0][2] if sources else None)
        h, w = dh if h is None else h, dw if w is None else w
    h, w = check_int("height", h), check_int("width", w)
    check_target_size(h, w, card.ar_cfg, text_to_image=not sources)
    d = card.defaults
    n_steps = rec.get("num_inference_steps", steps if steps is not None else d.get("num_inference_steps", 50))
    n_steps = check_int("num_inference_steps", n_steps, 1, card.num_train_timesteps)
    scale = rec.get("guidance_scale", guidance if guidance is not None else d.get("guidance_scale", 1.5))
    scale = check_float("guidance_scale", scale, 0, MAX_GUIDANCE)
    name = rec.get("file_name", f"{index:05d}.png")
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or pure.suffix.lower() not in SUFFIXES \
            or name == "metadata.jsonl":
        raise InputError(f"file_name={name!r} must be a relative path inside --out ending in "
                         f"{', '.join(SUFFIXES)}")
    extra = {k: v for k, v in rec.items() if k not in KEYS}
    return Job(index, prompt, seed, h, w, n_steps, scale, str(pure), tuple((n, b) for n, b, _ in sources), extra)


def pending(jobs: list[Job], out: Path) -> list[Job]:
    """The jobs whose image is not in `out` yet. An image there made from another prompt or seed is an error:
    the folder belongs to another prompts file (or the file changed), and mixing them would be silent."""
    from .outputs import read_parameters

    todo = []
    for job in jobs:
        f = out / job.file_name
        if not f.is_file():
            todo.append(job)
            continue
        made = read_parameters(f) or {}
        if (made.get("prompt"), made.get("seed")) != (job.prompt, job.seed):
            raise InputError(f"{str(f)!r} was made from prompt {made.get('prompt')!r} seed {made.get('seed')}, "
                             f"not line {job.index}'s ({job.prompt!r} seed {job.seed}): give a fresh --out",
                             "out")
    return todo


def write_image(out: Path, job: Job, data: bytes) -> None:
    """An encoded image into `out`, atomically (a crash leaves it whole or absent)."""
    from .outputs import write_file
    write_file(out / job.file_name, data, "out")


def write_metadata(out: Path, jobs: list[Job]) -> Path:
    """metadata.jsonl for every job, in the prompts file's order, written atomically once all are done."""
    from .outputs import write_file
    rows = "".join(json.dumps(job.metadata(), ensure_ascii=False) + "\n" for job in jobs)
    return write_file(out / "metadata.jsonl", rows.encode(), "out")


def render(pipe, job: Job, model: str, prior=None) -> bytes:
    """One job's image, encoded with its parameters: the AR (unless `prior`, an AR stage's Item, is given),
    then the DiT, as the server's stages run them (stages.py)."""
    from .outputs import FORMATS, encode_image
    from .serve import stages

    item = prior if prior is not None else draw(pipe, job)
    stages.encode_glyphs(pipe, [item])
    images = []
    stages.denoise(pipe, [item], _raise, lambda it, image: images.append(image))
    params = {**job.params(model), "glimage": __version__, **pipe.fast}
    return encode_image(images[0], FORMATS[Path(job.file_name).suffix.lower()], params)


def job_item(job: Job):
    """The job as the server's stages take it: a request for one image (stages.Item), sources decoded."""
    from .image import load_image
    from .serve import stages

    images = [load_image(data, name) for name, data in job.sources]
    req = stages.Request(job.prompt, job.height, job.width, job.steps, job.guidance, job.seed, 1, images)
    return stages.Item(req, 0, job.seed)


def draw(pipe, job: Job):
    """The AR stage of one job: its Item, holding its prior ids (and an edit's source ids)."""
    from .serve import stages

    item = job_item(job)
    stages.draw_priors(pipe, [item])
    return item


def _raise(req, status, message, reason, *_) -> None:
    raise RuntimeError(message)


def run(pipe, jobs: list[Job], out: Path, model: str, progress: bool = True) -> int:
    """Generate every pending job into `out`, one at a time; returns how many were drawn."""
    from tqdm.auto import tqdm

    todo = pending(jobs, out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="image", disable=not progress) as bar:
        for job in todo:
            write_image(out, job, render(pipe, job, model))
            bar.update()
    write_metadata(out, jobs)
    return len(todo)
