"""Print the README quickstart's N-th command (1: install and run, 2: install and test).

CI runs these strings, so that the commands a user copies are the commands CI tests.
"""

import sys
from pathlib import Path

text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
blocks = [b.split("```", 1)[0].strip() for b in quickstart.split("```bash\n")[1:]]
if len(blocks) != 2 or any("\n" in b for b in blocks):
    sys.exit(f"README's Quickstart must hold exactly two one-line bash commands, found {blocks!r}")
print(blocks[int(sys.argv[1]) - 1])
