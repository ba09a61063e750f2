"""Text to batches, in the order a token travels (each module's own docstring says more):

    corpus         input files -> documents (.txt, .jsonl, folders, globs; the built-in corpus)
    cleaning       which documents are kept: normalisation, length, character-class and duplicate rules
    near_dup       near-duplicate documents by MinHash LSH (datasketch)
    tokenizer      SentencePiece training and the `Tokenizer` the whole project uses
    shard_format   the shard set on disk: names, block keys, token dtype, the manifest and its checks
    shard_writer   documents -> pre-tokenized WebDataset tar shards (tools/make_shards.py)
    remote         shard sets behind a URL (fsspec: https, s3, gs, hf, ...), fetched file by file with retries
    shard_cache    a shard set's files for this process: the node's cache, verification once per node
    prefetch       fetching (or verifying) shards ahead of the read position, evicting passed ones
    shard_reader   open and check a shard set (a folder or a URL)
    sample_reader  read samples by id
    batch_plan     epoch order, length-bucketed global batches, the sequence-length schedule
    stream         the exact, resumable train stream and the validation stream of micro-batches

Names below are importable from the package (`from andy_dist.data import open_shards`), loaded on
first use, so reading shards never imports the writer.
"""

from andy_dist import lazy_exports as _lazy_exports

__getattr__, __dir__, __all__ = _lazy_exports(__name__, {
    "corpus": ("Document", "iter_documents", "read_documents", "resolve_inputs", "total_bytes",
               "write_default_corpus"),
    "tokenizer": ("Tokenizer", "train_tokenizer"),
    "shard_format": ("MANIFEST", "read_manifest"),
    "shard_writer": ("write_shards",),
    "shard_reader": ("ShardSet", "open_shards"),
    "shard_cache": ("DataAccess",),
    "cleaning": ("CleaningOptions",),
    "batch_plan": ("SeqLenSchedule",),
    "stream": ("MicroBatch", "TrainStream", "ValStream", "collate"),
})
