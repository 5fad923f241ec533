"""`python -m nanojax.chat_web RUN_DIR [...]`: the earlier name of `python -m nanojax.serve` (same arguments).

The chat page and its API are the OpenAI-compatible server's now (`nanojax.serve`: continuous batching,
`/v1/chat/completions`, the page at `/`), installed with `pip install -e '.[serve]'`.
"""
import sys

from nanojax.serve import main

if __name__ == "__main__":
    sys.exit(main())
