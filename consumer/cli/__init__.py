"""The `opstream` command line (argparse).

`main.py` builds it; one module per area registers its subcommands.
"""
