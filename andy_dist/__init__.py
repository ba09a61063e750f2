"""andy_dist: train the Andy-LLM family of small GPT models with DeepSpeed and ship them.

The path of one token, module by module:
    corpus -> tokenizer -> shards -> data -> engine/trainer (+checkpoint, metrics)
           -> quantize/modelfile (export) -> generate
"""

__version__ = "0.1.0"

# Fixed special ids, shared by the tokenizer, the data pipeline, the loss and generation.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


class UserError(Exception):
    """A mistake in the user's input (path, file, option): tools print it as one line and exit 2."""


def lazy_exports(package: str, homes: dict[str, tuple[str, ...]]):
    """(__getattr__, __dir__, __all__) for a subpackage that exports names from its modules.

    `homes` maps a module (relative to `package`) to the names it defines that callers use. A name is
    imported from its home only when first asked for (PEP 562), so importing one module of a package
    (the shard reader, say) never runs the others (the writer, the engine)."""
    import importlib

    home_of = {name: module for module, names in homes.items() for name in names}
    if len(home_of) != sum(len(names) for names in homes.values()):
        raise ValueError(f"{package}: a name is exported by two modules")

    def __getattr__(name: str):
        if name not in home_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home_of[name]}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(home_of) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__, list(home_of)
