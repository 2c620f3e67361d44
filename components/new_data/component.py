from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def new_data(
    images: dsl.Input[dsl.Dataset],
    views: dsl.Input[dsl.Dataset],
    clips: dsl.Input[dsl.Dataset],
    ingest_counts: dsl.Output[dsl.Metrics],
    ingest_report: dsl.Output[dsl.Markdown],
) -> int:
    """Items this run's ingests added; 0 skips the rest of the run (nothing new to train on).
    Shows each ingest's counts and rejections by reason."""
    from lumos.pipeline.steps import new_data_step

    datasets = {"images": images, "views": views, "clips": clips}
    return new_data_step(datasets, ingest_counts, ingest_report)
