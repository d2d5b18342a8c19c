"""``python record_exit.py SCRIPT ARGS``: run SCRIPT as its own process would (``__main__``), then write the
exit code into exit-<RANK> in the working folder, so that a test sees what each process torchrun started
ended with (torchrun's own exit code and report do not say it when torchrun itself was signalled)."""
import os
import runpy
import sys
from pathlib import Path

script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
code = 1  # an exception that is not SystemExit: Python's exit code
try:
    runpy.run_path(script, run_name='__main__')
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    raise
finally:
    Path(f'exit-{os.environ.get("RANK", 0)}').write_text(str(code))
