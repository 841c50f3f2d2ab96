"""Reading training data: tokenizers, shard preparation, and streaming from webdataset shards."""
