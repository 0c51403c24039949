"""Offline data stage: corpora -> tokenizer + webdataset shards + manifest.json (`python -m data_prep`).

sources.py reads inputs into documents, builtin.py holds the registry-installed default corpus,
tokenizer.py loads or trains the tokenizer, shards.py turns a chunk of documents into shards,
pipeline.py runs it all in parallel and resumably, manifest.py reads and checks the result.
"""
