"""The shared vocabulary of expertmesh nodes: wire schemas, identity, delta codec, transport, discovery."""
