"""llama.cpp's HTTP server on a GGUF file, through the `xllamacpp` wheel, until the process is stopped.

Run as a script (`python xllamacpp_server.py GGUF --parallel N --threads T --ctx-per-slot C`), not
imported: it needs nothing of mtpspec, so it starts in a fraction of a second. Once the server
listens it prints one line to stderr, `xllamacpp: ready {json}`, with the address and what the wheel
says about its build; then it sleeps until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

READY = "xllamacpp: ready "


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llama.cpp's server (xllamacpp wheel) on a GGUF file")
    p.add_argument("gguf")
    p.add_argument("--parallel", type=int, required=True, help="slots: sequences decoded together")
    p.add_argument("--threads", type=int, required=True, help="CPU threads for decoding and for prompts")
    p.add_argument("--ctx-per-slot", type=int, required=True, help="context tokens each slot holds")
    args = p.parse_args(argv)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.gguf
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port; listening_address says which
    params.n_parallel = args.parallel
    params.n_ctx = args.parallel * args.ctx_per_slot  # llama.cpp splits it evenly between the slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.ui = False
    server = xllamacpp.Server(params)
    info = {
        "url": server.listening_address,
        "version": getattr(xllamacpp, "__version__", None),
        "system_info": xllamacpp.get_system_info(),
        "build_info": xllamacpp.BUILD_INFO,
        "n_parallel": args.parallel,
        "n_ctx": params.n_ctx,
        "threads": args.threads,
    }
    print(READY + json.dumps(info), file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del server  # stops the server's threads before the interpreter goes
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # sigwait receives them
    sys.exit(main())
