"""`python -m distgan ...`: the `distgan` command."""

from distgan.cli import main

if __name__ == "__main__":
    main(prog_name="distgan")
