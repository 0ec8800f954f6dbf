"""The validator: rounds, ledger, intake, checks, scoring, merging, publishing."""
