"""editstack: benchmark instruction-based image editors with a vision-language judge.

The package both services and the runner install: the wire protocol, its codec and transport, the
runner, datasets and reports. It never imports torch.
"""

__version__ = "0.1.0"
