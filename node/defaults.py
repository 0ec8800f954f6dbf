"""Defaults of `expertmesh select` / `train`: the best ESFT point of scripts/bench_quality.py.

p 0.5 (token score) at lr 1e-3 kept the most in-domain gain (61% of full fine-tuning's) within a tenth
of full fine-tuning's forgetting (4.4%); docs/BENCHMARKS.md, "The ESFT frontier". The miner keeps
gentler ones for the network (node/miner/config.py says why). Kept free of heavy imports so the CLI
can show them in --help without loading torch.
"""
DEFAULT_LR = 1e-3  # AdamW learning rate of the selected experts
DEFAULT_P = 0.5  # ESFT cumulative routing share per layer
