"""The wire format every API family shares, as pydantic models, after vLLM's
entrypoints/openai/protocol.py.

Field names and defaults are OpenAI's, so the API is a declaration, not code; our
extensions are marked `# ours`. Fields an API declares that a text-only GPT-2 can't honour
(audio, images, reasoning, ...) are declared too, so that a request using them is refused
by name rather than silently ignored; any other unknown field is ignored. Here: the base
models, the refusals and the sampling fields (base.py), the chat message every family's
conversation becomes (messages.py), structured outputs and tools (structured.py), and the
tokenizer endpoints (tokenize.py). Each API family's own requests and answers are in its
folder: openai/protocol/, responses/protocol.py and answers.py, anthropic/protocol.py and
answers.py.
"""
from gptserve.server.protocol.base import *  # noqa: F401,F403
from gptserve.server.protocol.messages import *  # noqa: F401,F403
from gptserve.server.protocol.structured import *  # noqa: F401,F403
from gptserve.server.protocol.tokenize import *  # noqa: F401,F403
