"""`mtpspec bench serve`: throughput and latency of `mtpspec serve` (with and without a drafter) and
of llama.cpp's server on the same GGUF, under bursts of concurrent streaming clients. Talks to the
servers over HTTP only; each runs in a child process."""
