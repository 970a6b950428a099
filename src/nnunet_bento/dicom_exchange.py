"""A request's way in from and out to the PACS: its series pulled from a DICOM node into a
work folder before the run, its DICOM outputs pushed to nodes after the commit.

Nodes are named in server configuration only (NNUNET_BENTO_DICOM_NODES); a request names
a node, never an address, and every node it names is checked before any work starts.
"""

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import RequestError
from .pacs.nodes import DicomNode, resolve_node
from .pacs.pull import pull_series
from .pacs.push import push_files
from .request import InferenceRequest, InferenceResponse


class DicomExchange:
    """Pulls and pushes for requests, through the configured DICOM nodes."""

    def __init__(self, nodes: dict[str, DicomNode], work_dir: Path) -> None:
        self.nodes = nodes
        self.pulls = work_dir / "pulls"

    def check(self, request: InferenceRequest) -> None:
        """Every node the request names must be configured (400 otherwise)."""
        if request.dicom_source is not None:
            resolve_node("dicom_source.node", request.dicom_source.node, self.nodes)
        for index, name in enumerate(request.push_to or []):
            resolve_node(f"push_to[{index}]", name, self.nodes)
        if request.push_to and not (request.is_dicom or request.dicom_source):
            raise RequestError("push_to needs DICOM outputs: set is_dicom or dicom_source")

    @contextmanager
    def pulled(
        self, request: InferenceRequest, stage_series: list[list[str]]
    ) -> Iterator[tuple[Path, list[list[str]]]]:
        """Pull each stage's series (UIDs or descriptions) into a work folder; yields the
        folder and each stage's series as folders under it. The folder is removed after."""
        source = request.dicom_source
        assert source is not None
        node = resolve_node("dicom_source.node", source.node, self.nodes)
        folder = self.pulls / uuid.uuid4().hex
        try:
            entries = sorted({entry for series in stage_series for entry in series})
            pulled = pull_series(node, source.study_uid, entries, folder)
            names = {
                entry: path.relative_to(folder).as_posix()
                for entry, path in zip(entries, pulled, strict=True)
            }
            yield folder, [[names[entry] for entry in series] for series in stage_series]
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def push(self, request: InferenceRequest, response: InferenceResponse) -> list[dict[str, Any]]:
        """Send the committed DICOM outputs to each push_to node; failures are reported per
        file, never raised."""
        files = [
            Path(path)
            for path in (
                *response.dicom_segmentation,
                *response.dicom_fractional_segmentation,
                *response.dicom_struct,
            )
        ]
        results = []
        for name in request.push_to or []:
            node = resolve_node("push_to", name, self.nodes)
            results += [asdict(result) for result in push_files(node, files)]
        return results
