"""OpenAI's chat completions, completions and embeddings: their routes, wire format and serving classes."""
