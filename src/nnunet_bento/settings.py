"""Environment settings of the server and the CLI."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Settings read from the environment; each field's env name is its upper-case name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", protected_namespaces=())

    model_serve_spec: Path = Field(
        Path("model-serve-spec.yaml"), description="Path to the model registry (MODEL_SERVE_SPEC)."
    )
    totalseg_weights_path: Path | None = Field(
        None, description="Folder of TotalSegmentator weights; default <model_folder>/totalseg."
    )
    nnunet_serve_port: int = Field(12345, description="Port that `bentoml serve` listens on.")
    debug: bool = Field(False, description="Log full tracebacks of failed requests (DEBUG=1).")
    nnunet_bento_predictor_cache_size: int = Field(
        4, ge=1, description="Warm predictors kept per runner process."
    )
    nnunet_bento_gpu_wait_s: float = Field(
        600.0, ge=0, description="How long a request waits for min_mem of free GPU memory."
    )
    nnunet_bento_request_timeout_s: int = Field(
        3600, ge=1, description="Longest time one inference request may take."
    )


def load_settings() -> ServeSettings:
    """Read the settings from the environment now."""
    return ServeSettings()
