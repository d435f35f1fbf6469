import sys

from distill.cli import main

# NOTE: the guard matters: vLLM starts its engine in spawned processes, which re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
