"""`python -m engine.parallel worker SPEC.json`: one replica process (engine.parallel.replica)."""
import sys

from engine.parallel.replica import main

if __name__ == "__main__":
    sys.exit(main())
