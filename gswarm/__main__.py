"""`python -m gswarm` runs the CLI."""

from gswarm.cli import main

main()
