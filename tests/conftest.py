import os
import pathlib
import sys
import tempfile

# node_programs must be importable by name in spawned node processes too
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# comparisons keep this machine's compute profile between runs; tests keep theirs apart from the user's
os.environ["PYSIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="pysim-test-cache-")
