"""What the benchmark scripts share: how a result names the code it was measured at."""

import subprocess


def commit() -> str:
    """The short hash of the checked-out commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
