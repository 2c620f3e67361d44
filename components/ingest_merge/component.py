from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def ingest_merge(
    config_json: str,
    staging_uris: list,
    run_root: str,
    kind: str,
    dataset: dsl.Output[dsl.Dataset],
):
    """Merge the partitions (cross-partition dedup) and write the dataset manifest last."""
    from lumos.pipeline.steps import ingest_merge_step

    ingest_merge_step(config_json, staging_uris, run_root, kind, dataset)
