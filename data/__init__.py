"""Reading training data: text files now, webdataset token shards next."""
