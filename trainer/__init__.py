"""seqsentinel's offline trainer: learns the LSTM with PyTorch and exports one ONNX model file."""

from detector import __version__

__all__ = ["__version__"]
