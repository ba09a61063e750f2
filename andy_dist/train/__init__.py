"""Batches to checkpoints, in the order a run goes (each module's own docstring says more):

    run                 command line -> a checked plan -> engine, data, resume point -> Trainer.fit
    trainer             the training loop: steps, evaluation, checkpoints, early stopping, signals
    step                one optimizer step: loss normalisation, the learning rate, clipping and skipping on the
                        device, one read-back to the host
    lr_schedule         the learning rate of step k in closed form (linear warmup, cosine)
    engine              the DeepSpeed engine and the process group (DeepSpeed is imported inside its functions)
    checkpoint          saving and resuming through the engine (atomic tags, rotation, universal conversion)
    checkpoint_format   the checkpoint on disk: meta and its version rule, `latest`, tags, safe file loading
    distenv             the launcher's environment (rank, world size, master) without DeepSpeed
    step                one optimizer step through the engine, the loss normalised over the global batch
    metrics             W&B and metrics.jsonl logging, validation figures
    throughput          wall-clock and compute tokens/s, data wait, MFU and ETA of each training log line
    flops               FLOPs per token and model FLOPs utilisation
    samples             text the model writes while it trains, and its quality figures (sample_quality)
    watchdog            stack dumps of a stalled rank
    linelog             an append-only line file that survives a full disk (metrics, samples)
    overhead            ops and host syncs of a step, counted on CPU as a GPU pays them (benchmarks, tests)

Names below are importable from the package (`from andy_dist.train import Trainer`), loaded on first
use: importing the package imports neither DeepSpeed nor the engine.
"""

from andy_dist import lazy_exports as _lazy_exports

__getattr__, __dir__, __all__ = _lazy_exports(__name__, {
    "run": ("train",),
    "trainer": ("Trainer", "TrainState", "TrainingStopped"),
    "engine": ("build_engine", "init_distributed", "load_ds_config", "model_size", "resolve_ds_config",
               "shutdown_distributed"),
    "checkpoint_format": ("BEST_TAG", "LATEST_FILE", "META_FILE", "complete_tags", "read_latest", "read_meta",
                          "resolve_checkpoint", "step_tag", "verify_checkpoint_files"),
    "distenv": ("DistEnv", "detect"),
    "metrics": ("METRIC_KEYS", "SAMPLE_KEYS", "TRAIN_KEYS", "VAL_KEYS", "MetricsLogger"),
    "flops": ("MfuMeter",),
    "watchdog": ("StallReporter",),
})
