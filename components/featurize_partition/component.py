from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def featurize_partition(config_json: str, work_item: str) -> str:
    """Cache the frozen encoders' outputs for one shard range; returns the work item."""
    from lumos.pipeline.steps import featurize_partition_step

    return featurize_partition_step(config_json, work_item)
