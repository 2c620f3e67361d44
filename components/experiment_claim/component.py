from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def experiment_claim(
    preset: str,
    overrides_json: str,
    out_uri: str,
    report: dsl.Output[dsl.Markdown],
    results: dsl.Output[dsl.Artifact],
) -> None:
    """`lumos experiment claim`: arms A-D and the multi-frame priors; the report is the artifact."""
    from lumos.experiments.pipeline_step import claim_step

    claim_step(preset, overrides_json, out_uri, report, results)
