"""The miner daemon (`expertmesh miner run`): fetch, select, train, submit, once per round."""
