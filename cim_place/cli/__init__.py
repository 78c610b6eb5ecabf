"""The `cim-place` command line (Typer)."""
