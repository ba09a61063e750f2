#!/usr/bin/env python
"""Train an Andy-LLM model. Works under every launcher:

    deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/medium.json --data shards/NAME --out runs/NAME
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/tiny.json --data shards/NAME --out runs/NAME
    srun python launch/train.py --ds_config ds_configs/medium.json ...        (see launch/slurm/)
    python launch/train.py --ds_config ds_configs/single_gpu_8gb.json ...     (one process)

Add --dry-run to print the resolved rank / world / batch maths and exit; --resume to continue.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.train.run import train  # noqa: E402

if __name__ == "__main__":
    run_tool(train)
