"""Data: the embedded synthetic dataset, ingest of raw images into shards, and the shard reader."""
