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
