"""Running the Lumos pipeline: the step functions the KFP components call, and the local run."""
