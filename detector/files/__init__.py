"""The file drivers of the engine: reading CSV, Parquet and JSON lines, and replay."""
