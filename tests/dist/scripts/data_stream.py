"""Run under `torchrun --nproc_per_node 2`: each rank streams one epoch of a shard set with 2 real
DataLoader workers, all-reducing per micro-batch (a rank that ran dry would hang here), saves the
stream state mid-epoch, then resumes a fresh stream from that state; also one validation pass.

    torchrun --nproc_per_node 2 data_stream.py SHARD_DIR OUT_DIR STOP_STEP

Writes OUT_DIR/rank{R}.json with what this rank saw.
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from andy_dist.cli import mark_distributed_process, run_tool  # noqa: E402
from andy_dist.data.shard_reader import open_shards  # noqa: E402
from andy_dist.data.stream import TrainStream, ValStream  # noqa: E402


def record(step) -> dict:
    return {"epoch": step.epoch, "step": step.step_in_epoch, "global": step.global_sample_ids.tolist(),
            "ids": [mb.sample_ids.tolist() for mb in step.micro_batches],
            "workers": [mb.worker for mb in step.micro_batches], "global_targets": step.global_target_tokens}


def all_reduced_targets(step) -> int:
    """Sum over ranks of this rank's target tokens, one collective per micro-batch as in training."""
    total = 0
    for mb in step.micro_batches:
        count = torch.tensor([mb.num_target_tokens], dtype=torch.int64)
        dist.all_reduce(count)
        total += int(count)
    return total


def main() -> None:
    shard_dir, out_dir, stop = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    mark_distributed_process()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    shards = open_shards(shard_dir)
    make = lambda: TrainStream(shards, rank=rank, world_size=world, micro_batch_size=2, grad_accum=2,  # noqa: E731
                               seed=11, num_workers=2, max_seq_len=128)
    stream = make()
    full, reduced, state = [], [], None
    for step in stream.iter_epoch():
        full.append(record(step))
        reduced.append(all_reduced_targets(step))
        if len(full) == stop:
            state = json.loads(json.dumps(stream.state_dict()))
    states = [None] * world
    dist.all_gather_object(states, state)
    resumed_stream = make()
    resumed_stream.load_state_dict(state)
    resumed = [record(step) for step in resumed_stream.iter_epoch()]
    val = ValStream(shards, rank, world, micro_batch_size=3, max_seq_len=128, num_workers=2)
    val_ids, val_count = [], 0
    for mb in val:
        count = torch.tensor([mb.num_target_tokens], dtype=torch.int64)
        dist.all_reduce(count)
        val_count += 1
        val_ids.extend(i for i in mb.sample_ids.tolist() if i >= 0)
    out = {"rank": rank, "steps_per_epoch": stream.steps_per_epoch, "full": full, "reduced": reduced,
           "states_equal": all(s == states[0] for s in states), "resumed": resumed, "val_ids": val_ids,
           "val_count": val_count, "epoch_after": stream.epoch, "pid": os.getpid()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_tool(main)  # exits without interpreter teardown, as launch/train.py does
