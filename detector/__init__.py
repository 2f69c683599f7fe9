"""seqsentinel's runtime: per-key streaming anomaly scoring with onnxruntime.

Nothing in this package may import torch; the trainer depends on it, never the reverse.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("seqsentinel")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from detector.ops.logs import default_to_stderr  # after __version__, which it imports

default_to_stderr()
