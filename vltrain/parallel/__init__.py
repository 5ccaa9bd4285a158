"""Tensor, pipeline and data parallelism of VLModel on one DeviceMesh ("pp", "dp", "tp").

Modules are imported by their users (torch-heavy); this package file stays empty so that the
torch-free layout checks (layout.py) can be imported by clusterctl.
"""
