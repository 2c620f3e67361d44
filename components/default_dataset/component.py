from typing import NamedTuple

from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def default_dataset(
    config_json: str,
    compiled_config_json: str,
    runs_root: str,
    run_id: str,
    images_uri: str,
    views_uri: str,
    clips_uri: str,
    heads: str,
    pretrain_steps: int,
    finetune_steps: int,
    paired_fraction: float,
) -> NamedTuple(
    "Run",
    config_json=str,
    run_root=str,
    images_uri=str,
    views_uri=str,
    clips_uri=str,
    run_t2i=bool,
    run_novel_view=bool,
    run_video=bool,
):  # noqa: F821
    """The run's config (the compiled one, the run form, then config_json; a changed cluster.* is
    refused), its root (runs_root/run_id), its sources (or the embedded default dataset generated
    into it) and the heads it fine-tunes."""
    from collections import namedtuple

    from lumos.pipeline.steps import start_run

    form = {
        "images_uri": images_uri,
        "views_uri": views_uri,
        "clips_uri": clips_uri,
        "heads": heads,
        "pretrain_steps": pretrain_steps,
        "finetune_steps": finetune_steps,
        "paired_fraction": paired_fraction,
    }
    cfg, run_root, images, views, clips, run = start_run(
        config_json, compiled_config_json, runs_root, run_id, form
    )
    fields = "config_json run_root images_uri views_uri clips_uri run_t2i run_novel_view run_video"
    return namedtuple("Run", fields)(
        cfg, run_root, images, views, clips, run["t2i"], run["novel_view"], run["video"]
    )
