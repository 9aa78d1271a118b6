"""OpenAI's wire format as pydantic models, after vLLM's entrypoints/openai/protocol.py.

Field names and defaults are OpenAI's, so the API is a declaration, not code; our
extensions are marked `# ours`. OpenAI fields a text-only GPT-2 can't honour (tools,
structured output, audio, images) are declared too, so that a request using them is
refused by name rather than silently ignored; any other unknown field is ignored.
One module per API family; what they share is in base.py.
"""
from gptserve.server.protocol.base import *  # noqa: F401,F403
from gptserve.server.protocol.chat import *  # noqa: F401,F403
from gptserve.server.protocol.completions import *  # noqa: F401,F403
from gptserve.server.protocol.embeddings import *  # noqa: F401,F403
from gptserve.server.protocol.responses import *  # noqa: F401,F403
from gptserve.server.protocol.structured import *  # noqa: F401,F403
from gptserve.server.protocol.tokenize import *  # noqa: F401,F403
