"""Kubernetes resources Lumos renders and validates offline: the distributed-training TrainJob,
the KFP Pipeline / PipelineVersion / ScheduledWorkflow, and validation of any resource against
the CRDs (custom kinds) or the Kubernetes schemas (core kinds)."""
