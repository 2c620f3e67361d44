from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def featurize_merge(work_items: list, features: dsl.Output[dsl.Dataset]):
    """Check every partition finished and write the dataset's features.json last."""
    from lumos.pipeline.steps import featurize_merge_step

    featurize_merge_step(work_items, features)
