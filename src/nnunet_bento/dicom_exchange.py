"""A request's way in from and out to the PACS: its series pulled from a DICOM node into a
work folder before the run, its DICOM outputs pushed to nodes after the commit.

The plan has already resolved the nodes that the request names (server configuration only:
a request names a node, never an address).
"""

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .pacs.nodes import DicomNode
from .pacs.pull import pull_series
from .pacs.push import push_files
from .plan import PullPlan


@contextmanager
def pulled_study(pull: PullPlan, work_dir: Path) -> Iterator[tuple[Path, dict[str, Path]]]:
    """Pull every series the plan names (UIDs or descriptions) into a work folder; yields the
    folder and the folder of each entry. The folder is removed after."""
    folder = work_dir / "pulls" / uuid.uuid4().hex
    try:
        pulled = pull_series(pull.node, pull.study_uid, pull.entries, folder)
        yield folder, dict(zip(pull.entries, pulled, strict=True))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def push_outputs(nodes: tuple[DicomNode, ...], files: list[Path]) -> list[dict[str, Any]]:
    """Send the committed DICOM files to each node; failures are reported per file, never
    raised."""
    return [asdict(result) for node in nodes for result in push_files(node, files)]
