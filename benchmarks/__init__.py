"""Benchmarks: each runs with one command, prints a table and writes JSON (and PNG) to --out."""
