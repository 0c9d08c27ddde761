"""gswarm: model management for GPU clusters.

A head keeps the registry of models and of every copy across the cluster; agents on the
nodes hold a websocket to it, run the operations it pushes and stream progress back.
"""

__version__ = "0.4.0"
PROTOCOL_VERSION = 1
