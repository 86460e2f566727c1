"""The scheduler folder (`scheduler/scheduler_config.json`: diffusers' FlowMatchEulerDiscreteScheduler) <->
SchedulerConfig. Only the fields the flow schedule reads; the dynamic shift is required."""

from __future__ import annotations

from ..config import SchedulerConfig
from ..validate import InputError


def scheduler_from_official(d: dict) -> SchedulerConfig:
    kind = d.get("time_shift_type", "exponential")  # diffusers' default when the key is absent
    if not d.get("use_dynamic_shifting", True):
        raise InputError("scheduler_config.json has use_dynamic_shifting=false; GLM-Image needs the dynamic shift")
    return SchedulerConfig(num_train_timesteps=d.get("num_train_timesteps", 1000),
                           base_image_seq_len=d.get("base_image_seq_len", 256), base_shift=d.get("base_shift", 0.25),
                           max_shift=d.get("max_shift", 0.75), time_shift_type=kind)


def scheduler_to_official(cfg: SchedulerConfig) -> dict:
    return dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=cfg.num_train_timesteps,
                use_dynamic_shifting=True, time_shift_type=cfg.time_shift_type,
                base_image_seq_len=cfg.base_image_seq_len, base_shift=cfg.base_shift, max_shift=cfg.max_shift,
                max_image_seq_len=4096, shift=1.0)
