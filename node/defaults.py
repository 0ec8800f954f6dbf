"""Runtime defaults chosen by the README's sweep (scripts/esft_experiments.py, docs/esft_results.json).

Kept free of heavy imports so the CLI can show them in --help without loading torch.
"""
DEFAULT_LR = 3e-3  # AdamW learning rate of the selected experts
DEFAULT_P = 0.3  # ESFT cumulative routing share per layer
