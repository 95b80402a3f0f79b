"""`python -m magpie` runs the CLI."""

from magpie.cli import app

app(prog_name="magpie")
