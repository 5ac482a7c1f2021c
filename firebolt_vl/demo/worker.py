"""One demo job in its own process: `python -m firebolt_vl.demo.worker IN.pkl OUT.pkl` (see pipeline.run_jobs)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    spec, out = (argv if argv is not None else sys.argv[1:])[:2]
    from . import pipeline

    pipeline._init_worker(int(os.environ.get("FIREBOLT_DEMO_THREADS", "1")))
    name, args = pickle.loads(Path(spec).read_bytes())
    result = pipeline.JOBS[name](*args)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
