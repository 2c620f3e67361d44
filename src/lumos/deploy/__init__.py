"""Running the pipeline on a Kubeflow cluster through the KFP API: `lumos deploy` registers it and
its recurring run (`kfp_api`), `lumos trigger` starts a run when new data arrived (`trigger`)."""
