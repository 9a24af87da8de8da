import os
import sys

# tests import the upstream stand-in (tests/upstream_model.py) by name
sys.path.insert(0, os.path.dirname(__file__))
