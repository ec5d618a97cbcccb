"""Where calls are made: OpenAI-compatible clients, decorated functions, sync code."""
