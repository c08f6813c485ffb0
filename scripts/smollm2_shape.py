"""SmolLM2-135M's mlx-lm config, for random weights of its shapes in the benchmarks.

Used where the real model cannot be had (offline, no converter): the timings do not
depend on the weights' values. Read from ``smollm2_135m_config.json`` beside this
file with the standard library only, so that it imports before mlx does.
"""

import json
from pathlib import Path

SMOLLM2_135M = json.loads(
    Path(__file__).with_name("smollm2_135m_config.json").read_text()
)
