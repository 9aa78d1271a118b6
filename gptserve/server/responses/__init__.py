"""OpenAI's Responses API: its routes, wire format, serving class, stream events and stored responses."""
