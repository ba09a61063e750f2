"""The command-line tools, one module each. Every module has `main(argv=None) -> int` and `run()`, which is what
its console command (setup.cfg) and its `tools/<name>.py` script both call: the same program under two names.

    andy-tokenizer   tools/train_tokenizer.py     andy-export      tools/export.py
    andy-shards      tools/make_shards.py         andy-generate    tools/generate.py
    andy-train       launch/train.py              andy-evaluate    tools/evaluate.py
    andy-report      tools/report.py              andy-import-hf   tools/import_hf.py
    andy-sweep       tools/sweep.py
    tools/default_corpus.py and tools/model_sizes.py have no console command: they serve the demo.
"""
