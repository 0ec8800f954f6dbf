"""The model runtime every node uses, the miner daemon and the CLI."""
