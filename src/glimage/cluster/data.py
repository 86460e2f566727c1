"""`glimage generate --prompts FILE.jsonl --out DIR --ray [ADDRESS]`: offline batch generation on Ray Data.

The jobs not yet in DIR (glimage.batch.pending) stream through two actor pools: AR actors (prompt -> prior ids,
and an edit's source ids) and DiT actors (prior ids -> encoded image), each actor holding only its half of the
model. The images come back to this process, which writes each one atomically as it arrives, so a run killed
at any point and started again draws only what is missing, and the cluster needs no shared file system.
Every job runs as `glimage generate` runs it (glimage.batch.render): the same seeds give the same images.
"""

from __future__ import annotations

from pathlib import Path

from ..batch import Job, pending, render, write_image, write_metadata
from ..validate import InputError, check_float, check_int
from . import connect
from .replica import ModelSpec


class ARActor:
    """Prior ids of one job at a time (Ray Data calls it with batches of one row)."""

    def __init__(self, spec: ModelSpec):
        self.pipe = spec.load("ar")

    def __call__(self, rows: dict) -> dict:
        from ..batch import draw

        items = [draw(self.pipe, job) for job in rows["job"]]
        states = [{"prior": it.prior, "source_ids": it.source_ids, "source_grids": it.source_grids} for it in items]
        return {"job": rows["job"], "state": _objects(states)}


class DiTActor:
    """The encoded image of one job at a time, from the AR actor's prior ids."""

    def __init__(self, spec: ModelSpec, model: str):
        self.pipe, self.model = spec.load("dit"), model

    def __call__(self, rows: dict) -> dict:
        from ..batch import job_item

        out = []
        for job, state in zip(rows["job"], rows["state"]):
            item = job_item(job)  # the job as the stages' Item; the AR's results go into it
            item.prior, item.source_ids, item.source_grids = state["prior"], state["source_ids"], state["source_grids"]
            out.append(render(self.pipe, job, self.model, prior=item))
        return {"index": [job.index for job in rows["job"]], "data": _objects(out)}


def _objects(values: list):
    """A column of Python objects (Ray stores them as such; numpy's 'S' dtype would strip bytes' trailing zeros)."""
    import numpy as np

    col = np.empty(len(values), dtype=object)
    col[:] = values
    return col


def run_on_ray(jobs: list[Job], out: Path, args, progress: bool = True) -> int:
    """Draw the pending jobs on the cluster; returns how many were drawn."""
    from tqdm.auto import tqdm

    ar_actors = check_int("--ar-actors", args.ar_actors, 1, 4096)
    gpus = check_float("--gpus-per-actor", args.gpus_per_actor, 0, 64)
    todo = pending(jobs, out)
    out.mkdir(parents=True, exist_ok=True)
    if todo:
        # a GPU actor needs a CPU slot too, but a small one: the GPUs are what the pools are sized by
        cpus = 0.25 if gpus else 1
        if args.ray == "local" and args.dit_actors is not None and not gpus:
            # a local cluster as large as asked: the actors share this machine's cores (one thread each)
            import os
            ray = connect(args.ray, num_cpus=max(os.cpu_count() or 1, ar_actors + args.dit_actors))
        else:
            ray = connect(args.ray)
        total = ray.cluster_resources().get("GPU" if gpus else "CPU", 0)
        free = int(total / (gpus or cpus)) - ar_actors
        dit_actors = args.dit_actors if args.dit_actors is not None else max(1, free)
        check_int("--dit-actors", dit_actors, 1, 4096)
        if total < (ar_actors + dit_actors) * (gpus or cpus):
            raise InputError(f"{ar_actors} AR + {dit_actors} DiT actors need {(ar_actors + dit_actors) * (gpus or cpus):g} "
                             f"{'GPUs' if gpus else 'CPUs'}; the cluster has {total:g}", "dit_actors")
        threads = 1 if args.threads == "auto" else args.threads
        spec = ModelSpec(args.model, args.device, args.dtype, threads,
                         {"step_cache": args.step_cache, "ar_int8": args.ar_int8})
        ds = ray.data.from_items([{"job": job} for job in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(ARActor, fn_constructor_kwargs={"spec": spec}, batch_size=1, concurrency=ar_actors,
                            num_cpus=cpus, num_gpus=gpus)
        ds = ds.map_batches(DiTActor, fn_constructor_kwargs={"spec": spec, "model": args.model or "shipped"},
                            batch_size=1, concurrency=dit_actors, num_cpus=cpus, num_gpus=gpus)
        by_index = {job.index: job for job in todo}
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="image", disable=not progress) as bar:
            for row in ds.iter_rows():
                write_image(out, by_index[int(row["index"])], row["data"])
                bar.update()
    write_metadata(out, jobs)
    return len(todo)
