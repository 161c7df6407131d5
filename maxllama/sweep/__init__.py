"""Sweeps: expand a sweep file into runs, execute them (locally or on SLURM), resume, and report."""
