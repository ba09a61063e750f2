"""Checkpoint to text, in the order a model goes (each module's own docstring says more):

    export          a DeepSpeed checkpoint (any ZeRO stage, any rank count) -> fp32 weights, in one process
    quantize        int8 per-channel weights and the int8 linear layers
    model_file      the one-file model format (safetensors): write, check, load
    generate        batched generation with a KV cache
    token_sampling  temperature, top-k, top-p and repetition penalty

Names below are importable from the package (`from andy_dist.infer import load_model_file`), loaded
on first use. Nothing here imports DeepSpeed. (`generate` the function is not exported: the package
attribute of that name is the module.)
"""

from andy_dist import lazy_exports as _lazy_exports

__getattr__, __dir__, __all__ = _lazy_exports(__name__, {
    "export": ("load_checkpoint_weights",),
    "quantize": ("quantize_state_dict",),
    "model_file": ("load_model_file", "read_header", "save_model_file"),
    "generate": ("generate_text",),
    "token_sampling": ("SamplingConfig",),
})
