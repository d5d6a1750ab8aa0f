"""Run one command and print its wall time, CPU time and peak RSS (of every process it
waited for) as JSON: ``python -m benchmarks.measure -- CMD ARGS...``."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> None:
    command = sys.argv[sys.argv.index("--") + 1 :]
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "returncode": result.returncode,
                "wall_s": wall,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024,
                "stderr": result.stderr[-2000:] if result.returncode else "",
            }
        )
    )


if __name__ == "__main__":
    main()
