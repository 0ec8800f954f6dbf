"""`expertmesh demo`: bootstrap, validator and miners as local processes, observed round by round."""
