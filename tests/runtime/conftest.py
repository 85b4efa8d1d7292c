import sys
from pathlib import Path

# pytest runs in importlib mode, which does not put test folders on sys.path; the runtime tests
# share helpers from mil_test_utils.py next to this file.
sys.path.insert(0, str(Path(__file__).parent))
