"""`python -m orchestrator.config [prefix]`: every config key with its type, default and help."""

import sys

from orchestrator.config.describe import describe

if __name__ == "__main__":
    print("\n".join(describe(sys.argv[1] if len(sys.argv) > 1 else "")))
