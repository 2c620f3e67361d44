from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def ingest_plan(config_json: str, source_uri: str) -> list:
    """Split a source's keys into partitions for a ParallelFor fan-out of ingest."""
    from lumos.pipeline.steps import ingest_plan_step

    return ingest_plan_step(config_json, source_uri)
