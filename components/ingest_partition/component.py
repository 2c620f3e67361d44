from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def ingest_partition(
    config_json: str, source_uri: str, run_root: str, kind: str, partition: str
) -> str:
    """Ingest one key partition into a staging area; returns the staging URI."""
    from lumos.pipeline.steps import ingest_partition_step

    return ingest_partition_step(config_json, source_uri, run_root, kind, partition)
