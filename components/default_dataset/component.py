from typing import NamedTuple

from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def default_dataset(
    config_json: str, runs_root: str, run_id: str, compiled_cluster_json: str
) -> NamedTuple("Sources", run_root=str, images_uri=str, views_uri=str, clips_uri=str):  # noqa: F821
    """This run's root (runs_root/run_id), and the configured raw sources or the embedded default
    dataset generated into it. Refuses a config_json that changes the compiled cluster.*."""
    from collections import namedtuple

    from lumos.pipeline.steps import default_sources

    run_root, images, views, clips = default_sources(
        config_json, runs_root, run_id, compiled_cluster_json
    )
    return namedtuple("Sources", "run_root images_uri views_uri clips_uri")(
        run_root, images, views, clips
    )
