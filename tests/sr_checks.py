"""dcmqi's reading of a TID 1500 SR: what its tid1500reader finds in a Measurement Report."""

import json
import subprocess
from pathlib import Path
from typing import Any

from dicom_checks import TOOLS


def dcmqi_report(path: Path, out: Path) -> dict[str, Any]:
    """The JSON that tid1500reader writes for the SR at ``path`` (its copy kept at ``out``)."""
    result = subprocess.run(
        [TOOLS / "tid1500reader", "--inputDICOM", path, "--outputMetadata", out],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and out.exists(), result.stdout + result.stderr
    return json.loads(out.read_text())


def dcmqi_items(group: dict[str, Any], quantity: str) -> dict[str | None, dict[str, Any]]:
    """A group's measurement items of one quantity (CodeValue), keyed by derivation meaning."""
    return {
        item.get("derivationModifier", {}).get("CodeMeaning"): item
        for item in group["measurementItems"]
        if item["quantity"]["CodeValue"] == quantity
    }
