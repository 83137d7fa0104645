"""File-level I/O: safetensors headers, checkpoint discovery, streaming writers."""
