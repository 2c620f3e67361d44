from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def ingest_plan(config_json: str, source_uri: str, run_root: str, kind: str) -> list:
    """Split a source's keys into self-contained work items for a ParallelFor fan-out of ingest."""
    from lumos.pipeline.steps import ingest_plan_step

    return ingest_plan_step(config_json, source_uri, run_root, kind)
