"""`mtpspec serve`: an OpenAI-compatible HTTP server over `mtpspec.api.Pipeline`."""
