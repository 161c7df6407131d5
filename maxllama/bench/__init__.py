"""Benchmarks, run by hand on an idle machine (`make bench-data`, `make bench-ckpt`): they measure and print,
and assert nothing."""
