"""The vLLM layer: engine arguments (CPU defaults written once), the server, the teacher client, and the
quantized-kernel probe."""
