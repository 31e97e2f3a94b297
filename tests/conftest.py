import pathlib
import sys

# node_programs must be importable by name in spawned node processes too
sys.path.insert(0, str(pathlib.Path(__file__).parent))
