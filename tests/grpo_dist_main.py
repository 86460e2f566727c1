"""`glimage train` with one more reward, `redness` (mean red level of the image: a reward with spread even for a
random model); run directly or under torchrun by tests/test_grpo.py and tests/test_flow_grpo.py."""
import sys

import numpy as np

from glimage.cli import main
from glimage.train.rewards import register_reward


@register_reward("redness")
def redness(images, prompts, metadata):
    return [float(np.asarray(im, np.float32)[..., 0].mean() / 255) for im in images]


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
