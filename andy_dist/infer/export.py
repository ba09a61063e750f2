"""DeepSpeed checkpoint -> one fp32 state dict for `AndyLM`, in one CPU process.

A training checkpoint is a directory per tag written by `engine.save_checkpoint` from every rank:

    CKPT/latest                                    text: the newest complete tag
    CKPT/TAG/andy_meta.json                        the trainer's description (model config, step, ...)
    CKPT/TAG/[zero_pp_rank_R_]mp_rank_00_model_states.pt   module (empty under ZeRO-3), param shapes
    CKPT/TAG/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   fp32 master partitions (ZeRO 1-3)
    CKPT/tokenizer.model

Where the fp32 master weights live depends on the ZeRO stage:
  * stage 1/2: each rank holds a contiguous slice of one flat fp32 vector per parameter group; the
    slices concatenate in rank order, and parameters follow each other in `param_shapes` order.
  * stage 3: each parameter is split separately, ceil(numel / world) elements per rank (the last
    padded), and each rank's flat group concatenates its piece of every parameter in order.
  * stage 0: fp32 weights are the module itself; with bf16 or fp16 the module holds half-precision
    copies and the fp32 masters are the optimizer's `fp32_groups` (DeepSpeed 0.19; `fp32_groups_flat`,
    one flat tensor per group, in older versions): one list per optimizer parameter group, without
    names, in the group's order. The trainer records each group's parameter names in the meta
    (`optimizer_param_groups`); the masters are checked against the module (each master rounded to the
    module's dtype is the module's weight), so a mismatched layout is an error, never a silent export
    of the half-precision copies.
This mirrors `deepspeed.utils.zero_to_fp32`, which we cannot call: it unpickles with
`weights_only=False`. Here every file is read with `weights_only=True`, allowing only the few
plain DeepSpeed classes its optimizer states hold (loss scaler, stage enum, fragment address):
`andy_dist.train.checkpoint_format.load_safely`, which also holds the tag, `latest` and meta rules.

`load_checkpoint_weights` gives the weights as training holds them (embedding and head padded to
`ModelConfig.padded_vocab_size` rows); `load_logical_weights` gives what every exported format holds: the
rows of the token ids only, with the unpadded config that describes them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from andy_dist import UserError
from andy_dist.config import ModelConfig
from andy_dist.model import AndyLM
from andy_dist.train.checkpoint_format import load_safely, read_meta, resolve_checkpoint


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def _merge_zero12(flat_groups: list[list[torch.Tensor]], param_shapes: list[dict], paddings) -> dict:
    state: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(param_shapes):
        full = torch.cat([rank_groups[g] for rank_groups in flat_groups])  # rank slices in rank order
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > full.numel():
                raise UserError(f"ZeRO partitions hold {full.numel()} values, fewer than the parameters need")
            state[name] = full[offset : offset + numel].view(tuple(shape)).clone()
            offset += numel + (paddings[g][i] if paddings is not None else 0)
    return state


def _merge_zero3(flat_groups: list[list[torch.Tensor]], param_shapes: list[dict]) -> dict:
    world = len(flat_groups)
    per_rank = [torch.cat(groups) for groups in flat_groups]  # (rank's numel,) each
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [flat[offset : offset + part] for flat in per_rank]
            state[name] = torch.cat(pieces)[:numel].view(tuple(shape)).clone()
            offset += part
    if offset != per_rank[0].numel():
        raise UserError(f"ZeRO-3 partitions hold {per_rank[0].numel()} values per rank, parameters use {offset}")
    return state


def _zero0_weights(model_states: dict, meta: dict, where: Path) -> dict:
    buffers = set(model_states.get("buffer_names") or ())
    module = {name: t for name, t in model_states["module"].items() if name not in buffers}
    optimizer = model_states.get("optimizer")
    optimizer = optimizer if isinstance(optimizer, dict) else {}
    if optimizer.get("fp32_groups"):
        groups = [[t.float() for t in group] for group in optimizer["fp32_groups"]]
    elif optimizer.get("fp32_groups_flat"):
        groups = [[flat.float()] for flat in optimizer["fp32_groups_flat"]]
    else:  # fp32 training: the module's weights are the masters
        return {name: t.float() for name, t in module.items()}
    names = _group_names(meta)
    if len(names) != len(groups) or not {n for group in names for n in group} <= set(module):
        raise UserError(f"{where}: the optimizer's {len(groups)} parameter groups of fp32 master weights do not "
                        f"match the parameter groups its andy_meta.json names; was the meta copied from another run?")
    state = {}
    for group, group_names in zip(groups, names):
        flat = torch.cat([t.reshape(-1) for t in group])
        offset = 0
        for name in group_names:
            numel = module[name].numel()
            if offset + numel > flat.numel():
                raise UserError(f"{where}: the fp32 master weights of a parameter group hold {flat.numel()} "
                                f"values, fewer than its parameters ({', '.join(group_names[:3])}, ...) need")
            state[name] = flat[offset : offset + numel].view(module[name].shape).clone()
            offset += numel
    for name, master in state.items():
        half = module[name]
        if half.dtype != torch.float32 and not torch.equal(master.to(half.dtype), half):
            raise UserError(f"{where}: the fp32 master of {name} does not round to the module's {half.dtype} "
                            f"weights: the optimizer's parameter groups are not laid out as the meta says")
    return state


def _group_names(meta: dict) -> list[list[str]]:
    """Each optimizer group's parameter names: from the meta, or (checkpoints saved before the trainer
    recorded them) from the rule the trainer groups by, applied to the model of the meta's config."""
    recorded = meta.get("optimizer_param_groups")
    if recorded:
        return recorded
    from andy_dist.train.engine import parameter_groups  # the grouping rule; imports no DeepSpeed

    with torch.device("meta"):
        model = AndyLM(ModelConfig.from_dict(meta["model_config"]))
    ids = {id(param): name for name, param in model.named_parameters()}
    weight_decay = 1.0  # any non-zero value: only which parameters are decayed matters here
    return [[ids[id(p)] for p in group["params"]] for group in parameter_groups(model, weight_decay)]


def load_checkpoint_weights(ckpt_dir: str | Path, tag: str = "latest") -> tuple[dict[str, torch.Tensor], dict]:
    """The fp32 weights of checkpoint `tag` under `ckpt_dir`, keyed like `AndyLM.state_dict()`,
    and the trainer's metadata (andy_meta.json, plus "tag" (resolved: `latest` names its tag), "step"
    (the trainer's step at the save) and "checkpoint")."""
    ckpt, tag = resolve_checkpoint(ckpt_dir, tag)
    tag_dir = ckpt / tag
    meta = read_meta(tag_dir)
    # The step the weights were saved at is the trainer's (a `best` tag's is the step that was best).
    step = (meta.get("trainer_state") or {}).get("step", meta.get("step"))
    meta = dict(meta, tag=tag, step=step, checkpoint=str(ckpt.resolve()))
    cfg = ModelConfig.from_dict(meta["model_config"])

    model_files = sorted(tag_dir.glob("*model_states.pt"), key=_rank_of)
    optim_files = sorted(tag_dir.glob("*optim_states.pt"), key=_rank_of)
    if not model_files:
        raise UserError(f"{tag_dir} holds no *model_states.pt: the checkpoint is incomplete")
    model_states = load_safely(model_files[0])
    if optim_files:
        optim = [load_safely(f)["optimizer_state_dict"] for f in optim_files]
        stage = int(optim[0]["zero_stage"])
        world = optim[0]["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        if world != len(optim_files):
            raise UserError(f"{tag_dir} has {len(optim_files)} optimizer files but was saved by {world} ranks: "
                            f"the save did not finish on every rank; choose another --tag")
        param_shapes = model_states["param_shapes"]
        if stage <= 2:
            flats = [o["single_partition_of_fp32_groups"] for o in optim]
            state = _merge_zero12(flats, param_shapes, optim[0].get("param_alignment_paddings"))
        else:
            state = _merge_zero3([o["fp32_flat_groups"] for o in optim], param_shapes)
    else:
        state = _zero0_weights(model_states, meta, tag_dir)
    for name in model_states.get("buffer_names") or ():  # a stored position table: whole in every module file
        if name in model_states["module"]:
            state.setdefault(name, model_states["module"][name].float().clone())
    shared = model_states.get("shared_params") or {}  # DeepSpeed: {name not stored: name holding the data}
    for alias, source in shared.items() if isinstance(shared, dict) else shared:
        state.setdefault(alias, state[source])
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed.weight"])
    _check_keys(state, cfg, tag_dir)
    return state, meta


VOCAB_ROWS = ("embed.weight", "lm_head.weight")


def logical_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                       vocab_size: int | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(weights, config) with the embedding and LM head cut to the first `vocab_size` rows, the config unpadded.

    vocab_size: the token ids to keep; by default the model's (`cfg.vocab_size`: only the padding goes).
    A tokenizer with fewer pieces than the model passes its own size: the rows no token id reaches go too.
    The trimmed model gives every kept id the same logit as before, so its distribution over them is the
    trained model's with the other ids masked, which is what sampling during training does.
    """
    keep = cfg.vocab_size if vocab_size is None else vocab_size
    if keep > cfg.vocab_size:
        raise UserError(f"the tokenizer has {keep} pieces but the model {cfg.vocab_size}: export with the run's "
                        f"own tokenizer.model")
    trimmed = dict(state)
    for name in VOCAB_ROWS:
        if name in trimmed and trimmed[name].shape[0] != keep:
            trimmed[name] = trimmed[name][:keep].clone()
    if cfg.tie_embeddings and "lm_head.weight" in trimmed:
        trimmed["lm_head.weight"] = trimmed["embed.weight"]
    return trimmed, cfg.replace(vocab_size=keep, vocab_pad_multiple=1)


def load_logical_weights(ckpt_dir: str | Path, tag: str = "latest",
                         vocab_size: int | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """The fp32 weights of checkpoint `tag` as an export holds them, their config, and the checkpoint's meta.

    The one entry point for writing a trained model in any format (`.andy`, Hugging Face): the padded
    vocabulary rows are gone, and with `vocab_size` (the tokenizer's pieces) so are the rows past it.
    Keys are `AndyLM.state_dict()`'s; `AndyLM(cfg).load_state_dict(weights)` takes them as they are.
    """
    state, meta = load_checkpoint_weights(ckpt_dir, tag)
    state, cfg = logical_state_dict(state, ModelConfig.from_dict(meta["model_config"]), vocab_size)
    return state, cfg, meta


def _check_keys(state: dict, cfg: ModelConfig, where: Path) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AndyLM(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise UserError(f"{where} does not match its model_config: missing {missing[:5]}, unexpected {extra[:5]}, "
                        f"wrong shapes {wrong[:5]}")


def describe_checkpoint(meta: dict) -> dict:
    """What a model file or model card records of the checkpoint it came from."""
    trainer = meta.get("trainer_state") or {}
    info = {k: meta.get(k) for k in ("checkpoint", "tag", "zero_stage", "world_size", "precision", "data")}
    info.update(step=trainer.get("step", meta.get("step")), tokens_seen=trainer.get("tokens_seen"),
                best_val_loss=trainer.get("best_val_loss"), best_step=trainer.get("best_step"))
    if meta.get("averaged_tags"):
        info["averaged_tags"] = list(meta["averaged_tags"])
    return info
