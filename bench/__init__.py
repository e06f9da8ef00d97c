"""Benchmarks for gemini-batchd against its emulator: `python -m bench.<name> --help`."""
