"""The output contract in code: record types, Parquet schemas, file names and the manifest."""
