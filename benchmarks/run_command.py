"""``python -m benchmarks.run_command REPORT.json ARGS…``: run ``selfage ARGS`` in this process (as
``python -m selfage_cli`` does) and write its peak memory to REPORT.json at exit (benchmarks/commands.py)."""

from __future__ import annotations

import json
import resource
import sys


def main() -> None:
    report, args = sys.argv[1], sys.argv[2:]
    code: int | str | None = 0
    try:
        from selfage_cli.cli import app

        app(args=args, prog_name="selfage")
    except SystemExit as exc:
        code = exc.code
    finally:
        peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        with open(report, "w", encoding="utf-8") as handle:
            json.dump(peak, handle)
    sys.exit(code)


if __name__ == "__main__":
    main()
