#!/usr/bin/env python
"""Train an Andy-LLM model (the same program as the `andy-train` command). Works under every launcher:

    deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/medium.json --data shards/NAME --out runs/NAME
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/tiny.json --data shards/NAME --out runs/NAME
    srun python launch/train.py --ds_config ds_configs/medium.json ...        (see launch/slurm/)
    python launch/train.py --ds_config ds_configs/single_gpu_8gb.json ...     (one process)

Add --dry-run to print the resolved rank / world / batch maths and exit; --resume to continue.
"""

from andy_dist.commands.train import run

if __name__ == "__main__":
    run()
