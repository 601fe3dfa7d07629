import sys
from pathlib import Path

# Let the tests import helpers.py beside them.
sys.path.insert(0, str(Path(__file__).parent))
