"""The OpenAI surface: chat and legacy completions, models, the Responses API, tokenize, and the one
generation pipeline (prepare, start, collect, stream) the other surfaces render."""
