"""The `pikv` command: generate, eval, distill, info. `main` is the console script's entry point."""

from pikv_jax.cli.main import main

__all__ = ["main"]
