"""``make test``: the whole suite, as two pytest runs side by side when no arguments are given.

The integration tests (tests/integration/) spend most of their time waiting on the processes
they start, the unit tests use the CPU: run together on the 2 cores they take about the time
of the integration tests alone.  Each run's output is shown whole once it ends (unit tests
first), never interleaved.  With arguments (``make test ARGS="-k scenario"``) it is one
plain pytest run with them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile


def main(argv: list[str]) -> int:
    if argv:
        return subprocess.call([sys.executable, "-m", "pytest", *argv])
    runs = [("unit tests", ["tests", "--ignore=tests/integration"]),
            ("integration tests", ["tests/integration", "-p", "no:cacheprovider"])]
    print("make test: the unit and the integration tests side by side; each run's output "
          "comes when it ends (about 1 and 4 minutes)", flush=True)
    started = []
    for name, args in runs:
        out = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], stdout=out,
                                stderr=subprocess.STDOUT)
        started.append((name, proc, out))
    failed = []
    for name, proc, out in started:
        code = proc.wait()
        out.seek(0)
        sys.stdout.write(f"\n===== {name} =====\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(out.read())
        sys.stdout.flush()
        if code:
            failed.append(f"{name} (pytest exit {code})")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    print("\nmake test: every test passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
