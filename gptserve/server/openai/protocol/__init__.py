"""OpenAI's chat completions, completions and embeddings on the wire, one module per endpoint."""
