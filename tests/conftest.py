import os
import sys

# tests import the top-level modules (model.py, cache.py, ...) the way a reader runs them: from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
