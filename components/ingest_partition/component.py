from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def ingest_partition(config_json: str, work_item: str) -> str:
    """Ingest one key partition into its staging area; returns the staging URI."""
    from lumos.pipeline.steps import ingest_partition_step

    return ingest_partition_step(config_json, work_item)
