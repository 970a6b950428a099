"""The pipeline of the benchmarks that run in-process: demo models, runners in this process."""

from pathlib import Path

from nnunet_bento.catalog.registry import build_registry
from nnunet_bento.catalog.spec import parse_spec
from nnunet_bento.pipeline import SegmentationPipeline
from nnunet_bento.runners.device import DeviceSelector
from nnunet_bento.runners.nnunet_runner import RunnerModel, RunnerSet

REPO = Path(__file__).resolve().parents[2]


def demo_pipeline(*model_ids: str) -> SegmentationPipeline:
    """A pipeline over the demo models ``model_ids`` (examples/models), every predictor warm."""
    spec = parse_spec(
        {
            "model_folder": str(REPO / "examples" / "models"),
            "models": [{"id": model_id, "rel_path": model_id} for model_id in model_ids],
        },
        "bench spec",
    )
    registry = build_registry(spec)
    runners = RunnerSet(
        {m.id: RunnerModel(m.folder) for m in registry.models.values()},
        DeviceSelector.for_this_machine(wait_s=60),
        cache_size=2 * len(model_ids),
    )
    return SegmentationPipeline(registry, runners)
