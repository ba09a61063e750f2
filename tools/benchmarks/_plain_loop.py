"""Baseline for `bench.py train`: a plain PyTorch DDP loop over the same model, batch and data.

Run under torchrun by tools/benchmarks/train.py. Same AndyLM, same TrainStream micro-batches, same
loss normalisation (summed token loss / global target tokens), torch AdamW, clipping 1.0; no
DeepSpeed, no checkpoints, no logging. Rank 0 writes {"tokens_per_s": ...} over the timed steps.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from andy_dist.cli import mark_distributed_process, run_tool
from andy_dist.config import model_config
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.stream import TrainStream
from andy_dist.model import AndyLM


def main(shards_dir: str, out: str, steps: int, warmup: int, micro: int, accum: int, vocab: int) -> None:
    dist.init_process_group("gloo")
    mark_distributed_process()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(AndyLM(model_config("tiny", vocab_size=vocab)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=0.01)
    stream = TrainStream(open_shards(shards_dir), rank=rank, world_size=world, micro_batch_size=micro,
                         grad_accum=accum, seed=1234)
    tokens, start = 0, None
    for step, item in enumerate(stream.iter_epoch()):
        if step == warmup:
            start, tokens = time.perf_counter(), 0
        if step == warmup + steps:
            break
        local = torch.tensor([float(sum(mb.num_target_tokens for mb in item.micro_batches))])
        dist.all_reduce(local)
        for index, mb in enumerate(item.micro_batches):
            last = index == len(item.micro_batches) - 1
            with model.no_sync() if not last else torch.enable_grad():
                out_ = model(mb.input_ids, targets=mb.targets)
                (out_.loss_sum * world / local[0]).backward()  # DDP averages over ranks
            tokens += int(mb.num_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    total = torch.tensor([float(tokens)])
    dist.all_reduce(total)
    if rank == 0:
        Path(out).write_text(json.dumps({"tokens_per_s": total.item() / elapsed, "steps": steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_tool(lambda: main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])))  # no interpreter teardown
