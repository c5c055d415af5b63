"""`python -m bench --baseline REV`: another revision's bridge, to run beside this one.

No third-party imports: the test suite imports this without the `bench` extra.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path


class BaselineError(Exception):
    """`--baseline REV` cannot be checked out; the message says why."""


def check_out_baseline(revision: str, into: Path, repository: Path) -> str:
    """Extract `revision`'s `bridge` package of `repository` into `into` (git archive: no
    worktree to clean up); returns the commit it names."""
    git = ["git", "-C", str(repository)]
    named = subprocess.run(  # noqa: S603 - git with our own arguments
        [*git, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = named.stdout.strip()
    if named.returncode != 0 or not commit:
        raise BaselineError(
            f"--baseline {revision}: not a commit of this repository; give a commit, "
            "branch or tag (git log --oneline shows them)"
        )
    archive = subprocess.run(  # noqa: S603 - git with our own arguments
        [*git, "archive", "--format=tar", commit, "bridge"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise BaselineError(f"--baseline {revision}: git archive failed: {archive.stderr!r}")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return commit
