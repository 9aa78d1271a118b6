"""Anthropic's Messages API: its routes, wire format (requests and answers) and serving class."""
