from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def new_data(
    images: dsl.Input[dsl.Dataset], views: dsl.Input[dsl.Dataset], clips: dsl.Input[dsl.Dataset]
) -> int:
    """Items this run's ingests added; 0 skips the rest of the run (nothing new to train on)."""
    from lumos.pipeline.steps import new_data_step

    return new_data_step({"images": images, "views": views, "clips": clips})
