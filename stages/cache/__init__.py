"""The reference cache: its Parquet format and contract, fingerprints, shard jobs and their merge."""
