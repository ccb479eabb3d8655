"""Write constraints.txt: the exact versions of this environment (`pip freeze`, adtrain itself left out),
each limited by an environment marker to the Python minor version and platform they were installed on.
`make install` installs with `-c constraints.txt`, so CI and a developer on that Python and platform
get the versions the test suite passed with; elsewhere the markers are false and pyproject.toml's
ranges alone apply. Run `make lock` after `make test` passed in a fresh `make install` (with the
constraints file moved aside to take the registry's newest versions)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path


def main(out: str) -> None:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.split()
    pins = sorted((line for line in frozen if "==" in line and not line.lower().startswith("adtrain==")),
                  key=str.lower)
    marker = f'python_version == "{sys.version_info.major}.{sys.version_info.minor}" and sys_platform == "{sys.platform}"'
    head = [
        "# The versions `make test` passed with (written by `make lock`, .ci/lock.py; "
        f"{datetime.date.today().isoformat()}, Python {sys.version.split()[0]}, {sys.platform}).",
        "# `make install` installs with -c constraints.txt; each pin applies only on that Python and platform.",
    ]
    Path(out).write_text("\n".join(head + [f"{pin} ; {marker}" for pin in pins]) + "\n")
    print(f"{out}: {len(pins)} pins for {marker}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
