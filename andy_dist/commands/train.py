"""Train an Andy-LLM model: `andy-train` is `launch/train.py` (the deepspeed launcher needs a script path).

    andy-train --ds_config ds_configs/single_gpu_8gb.json --data shards/NAME --out runs/NAME      (one process)
    torchrun --no-python --nproc_per_node 2 andy-train --ds_config ds_configs/tiny.json --data shards/NAME ...
    deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/medium.json --data shards/NAME --out runs/NAME

The arguments are documented in andy_dist/train/run.py (`andy-train --help`).
"""

from andy_dist.cli import run_tool


def run() -> None:
    from andy_dist.train.run import train

    run_tool(train)
