"""expertmesh: fine-tune Mixture-of-Experts models domain by domain over a peer-to-peer mesh.

One installed package; its parts live in the repository's top-level folders (setuptools maps them):
`expertmesh.kernels` (kernels/), `expertmesh.protocol` (protocol/), `expertmesh.node` (node/),
`expertmesh.validator` (validator/).
"""
__version__ = "0.1.0"
