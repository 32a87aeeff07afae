"""The `ragingest` command: one module per group of subcommands, apart from the flows they run."""
