from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def ingest(
    config_json: str, source_uri: str, run_root: str, kind: str, dataset: dsl.Output[dsl.Dataset]
):
    """Decode, validate, deduplicate, resize and shard one source into a dataset."""
    from lumos.pipeline.steps import ingest_step

    ingest_step(config_json, source_uri, run_root, kind, dataset)
