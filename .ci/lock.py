"""Write this interpreter's section of constraints.txt: the exact versions of the running environment
(`pip freeze`, adtrain itself left out), each limited by an environment marker to this Python
(full version: packages may require a newer patch release) and platform. Sections of other
interpreters are kept. `make install` installs with `-c constraints.txt`, so CI and a developer on
an interpreter with a section get the versions the test suite passed with there; elsewhere every
marker is false and pyproject.toml's ranges alone apply. Run it (`make lock`) in an environment that
has just passed `make test`."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path


def main(out: str) -> None:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.split()
    pins = sorted((line for line in frozen if "==" in line and not line.lower().startswith("adtrain==")),
                  key=str.lower)
    marker = f'python_full_version == "{platform.python_version()}" and sys_platform == "{sys.platform}"'
    path = Path(out)
    kept = [line for line in (path.read_text().splitlines() if path.is_file() else [])
            if line.strip() and not line.startswith("#") and not line.endswith(f"; {marker}")]
    sections = sorted({line.split("; ", 1)[1] for line in kept if "; " in line} | {marker})
    head = [
        "# The versions `make test` passed with, per interpreter (`make lock`, .ci/lock.py; this",
        f"# interpreter's section written {datetime.date.today().isoformat()}). `make install` installs with -c constraints.txt;",
        "# each pin applies only where its marker holds. Sections: " + "; ".join(s for s in sections),
    ]
    lines = kept + [f"{pin} ; {marker}" for pin in pins]
    path.write_text("\n".join(head + sorted(lines, key=lambda s: (s.split("; ", 1)[-1], s.lower()))) + "\n")
    print(f"{out}: {len(pins)} pins for {marker}; {len(sections)} section(s)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
