"""The service kit: what the editor and the scorer services share around their models (settings
from the environment, per-item input checks, the process entry point, Qwen processor loading), the
model-free echo service, and the tiny-model building blocks. Built on `editstack.wire`."""
