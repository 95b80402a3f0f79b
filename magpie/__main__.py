"""`python -m magpie` runs the CLI (under the crash supervisor, as the `magpie` command does)."""

from magpie.supervisor import main

main()
