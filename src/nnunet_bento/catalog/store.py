"""Import nnU-Net result folders into the Bento model store, and find them again."""

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError
from .model_folder import (
    CHECKPOINT_GLOB,
    describe_model_folder,
    file_sha256,
    read_checkpoint_identity,
)

MODEL_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
VERSION_LENGTH = 16


@dataclass(frozen=True)
class ImportResult:
    """The tag an import resolved to, and whether it added a new version."""

    tag: str
    created: bool


def model_files(folder: Path) -> list[Path]:
    """The files that serving needs, relative to the folder: JSONs and fold checkpoints."""
    folds = sorted(p.relative_to(folder) for p in folder.glob(f"fold_*/{CHECKPOINT_GLOB}"))
    return [Path("dataset.json"), Path("plans.json"), *folds]


def content_version(folder: Path, files: list[Path]) -> str:
    """A version string that changes exactly when one of the files changes."""
    digest = hashlib.sha256()
    for relative in files:
        digest.update(f"{relative.as_posix()}:{file_sha256(folder / relative)}\n".encode())
    return digest.hexdigest()[:VERSION_LENGTH]


def build_metadata(folder: Path, model_id: str, name: str | None) -> dict[str, Any]:
    """What the Bento model records about the folder it came from."""
    description = describe_model_folder(folder)
    checkpoint_hashes: dict[str, str] = {}
    identity = None
    for fold, names in description.checkpoints.items():
        for checkpoint in names:
            identity = read_checkpoint_identity(folder / f"fold_{fold}" / checkpoint)
            checkpoint_hashes[f"fold_{fold}/{checkpoint}"] = identity.sha256
    assert identity is not None, "describe_model_folder guarantees one checkpoint"
    return {
        "nnunet_id": model_id,
        "name": name or model_id,
        "trainer": identity.trainer,
        "configuration": identity.configuration,
        "checkpoint_sha256": checkpoint_hashes,
        **description.to_metadata(),
    }


def import_model(folder: Path, model_id: str, name: str | None = None) -> ImportResult:
    """Save an nnU-Net result folder in the Bento model store.

    The version is a hash of the files, so importing an unchanged folder again is idempotent:
    it returns the existing tag with ``created=False``. A changed folder gets a new version.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    folder = Path(folder).resolve()
    if not MODEL_ID_PATTERN.match(model_id):
        raise ModelFolderError(
            f"model id {model_id!r} is not a valid Bento model name: use lower-case letters, "
            "digits, '-', '_' and '.', starting with a letter or digit"
        )
    metadata = build_metadata(folder, model_id, name)
    files = model_files(folder)
    tag = f"{model_id}:{content_version(folder, files)}"
    try:
        return ImportResult(str(bentoml.models.get(tag).tag), created=False)
    except NotFound:
        pass
    labels = {"framework": "nnunetv2", "configuration": metadata["configuration"]}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for relative in files:
            target = Path(model.path) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / relative, target)
    return ImportResult(tag, created=True)


def stored_model(tag: str) -> tuple[Path, dict[str, Any]]:
    """The folder and metadata of a model in the store; a clear error when it is absent."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound as error:
        raise ModelFolderError(
            f"Bento model {tag} is not in the model store; import it with "
            f"`nnunet-bento import-model MODEL_DIR --id {tag.split(':')[0]}`"
        ) from error
    return Path(model.path), dict(model.info.metadata)
