"""Environment settings of the server and the CLI."""

import tempfile
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
    nnunet_bento_allowed_hosts: str = Field(
        "",
        description="Host names, joined by ',', that a server without a token answers besides "
        "loopback (localhost, 127.0.0.1, [::1]); the health probes answer any Host.",
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
    nnunet_bento_dicom_nodes: Path | None = Field(
        None, description="YAML file of the DICOM nodes that requests may name."
    )
    nnunet_bento_webhooks: Path | None = Field(
        None,
        description="YAML file of the webhooks that jobs and listener routes may notify "
        "(name, url, secret_env); unset: none.",
    )
    nnunet_bento_listener: Path | None = Field(
        None,
        description="YAML file of the DICOM listener (AE title, port, calling AE titles, "
        "settle_s, routes); set, `bentoml serve` listens too. Needs NNUNET_BENTO_OUTPUT_ROOT.",
    )
    nnunet_bento_shared_memory: bool = Field(
        True,
        description="Pass arrays to a ModelRunner on the same host through shared memory "
        "instead of the socket (a job that /dev/shm has no room for goes inline).",
    )
    nnunet_bento_work_dir: Path = Field(
        Path(tempfile.gettempdir()) / "nnunet-bento",
        description="Our work folder: output locks, staging records, uploads, job records.",
    )
    nnunet_bento_max_upload_mb: int = Field(
        2048, ge=1, description="Largest study archive an upload may send."
    )
    nnunet_bento_max_unpacked_mb: int = Field(
        16384, ge=1, description="Most that an uploaded archive may unpack to (zip bombs)."
    )
    nnunet_bento_job_ttl_s: float = Field(
        86400, gt=0, description="How long a finished job and its result are kept."
    )
    nnunet_bento_max_voxels: int = Field(
        200_000_000, ge=1, description="Most voxels of one input image, checked from its header."
    )
    nnunet_bento_max_probability_mb: float = Field(
        2048, gt=0, description="Most memory for the probabilities a stage keeps (float32)."
    )
    nnunet_bento_max_work_mb: int = Field(
        32768,
        ge=1,
        description="Most the work folder may hold (uploads, their extraction, results, pulled "
        "series); an upload that does not fit is a 507.",
    )
    nnunet_bento_max_pipelines: int = Field(
        2, ge=1, description="Requests that run their pipeline at once in an API worker."
    )
    nnunet_bento_max_queue: int = Field(
        8, ge=0, description="Requests that wait for a pipeline slot; more get a 503."
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


def allowed_hosts(settings: ServeSettings) -> list[str]:
    """NNUNET_BENTO_ALLOWED_HOSTS as a list of lower-case host names."""
    return [
        host.strip().lower()
        for host in settings.nnunet_bento_allowed_hosts.split(",")
        if host.strip()
    ]
