"""CLI commands beyond training and rendering, one module per area.

Each module registers its commands on `infd.cli.app` when imported; `infd.cli` imports
them all at its end, so `infd --help` lists every command.
"""
