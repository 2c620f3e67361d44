from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def featurize_plan(config_json: str, dataset: dsl.Input[dsl.Dataset]) -> list:
    """Split a dataset's shards into self-contained work items for a ParallelFor of featurize."""
    from lumos.pipeline.steps import featurize_plan_step

    return featurize_plan_step(config_json, dataset)
