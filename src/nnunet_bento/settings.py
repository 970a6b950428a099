"""Environment settings of the server and the CLI."""

from pathlib import Path

from pydantic import Field, SecretStr
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
    nnunet_serve_host: str = Field(
        "127.0.0.1",
        description="Address `bentoml serve` binds (--host overrides); 0.0.0.0 for every "
        "interface, as the container image sets it.",
    )
    nnunet_bento_input_roots: str | None = Field(
        None,
        description="Folders that request inputs may lie in, joined by ':'; unset: unrestricted.",
    )
    nnunet_bento_output_root: str | None = Field(
        None, description="Folder that output_dir must lie in; unset: unrestricted."
    )
    nnunet_bento_api_token: SecretStr | None = Field(
        None, description="Bearer token every route but the health probes needs; unset: none."
    )
    nnunet_bento_allowed_origins: str = Field(
        "", description="Web origins, joined by ',', allowed besides the server's own."
    )
    nnunet_bento_download_weights: bool = Field(
        False, description="Download a missing TotalSegmentator task's weights at start-up."
    )
    nnunet_bento_totalseg_url_base: str | None = Field(
        None, description="Base URL of TotalSegmentator weight archives (a local mirror)."
    )
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


def allowed_origins(settings: ServeSettings) -> list[str]:
    """NNUNET_BENTO_ALLOWED_ORIGINS as a list."""
    return [
        origin.strip()
        for origin in settings.nnunet_bento_allowed_origins.split(",")
        if origin.strip()
    ]
